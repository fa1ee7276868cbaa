"""Atomic, self-verifying checkpoints; the last K kept; a damaged one skipped loudly.

File layout (one file per checkpoint, ``step-00001200.ckpt``)::

    b"SPARSECOMM-CKPT-1\\n" + sha256(payload).hexdigest() + b"\\n" + payload

where ``payload`` is ``torch.save`` of a dict of tensors and plain Python values (loaded with
``weights_only=True``). A write goes to a temporary file in the same directory, is fsynced,
renamed over the final name and the directory fsynced, so a crash at any point leaves either
the new checkpoint complete or no trace of it: the previous one stays loadable. Only the
caller's rank 0 should write.
"""
from __future__ import annotations

import glob
import hashlib
import io
import os
import random
import re
import sys
import tempfile
import warnings
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

MAGIC = b"SPARSECOMM-CKPT-1\n"
_NAME = re.compile(r"step-(\d{8,})\.ckpt$")


class CorruptCheckpoint(ValueError):
    """A checkpoint file whose hash does not match its contents (truncated or damaged)."""


def write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_safetensors(path: str, what: str, fix: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """``(metadata, tensors)`` of a safetensors file; any unreadable file is one ValueError naming it.

    ``what`` names the kind of file ("mask file"), ``fix`` what to do about it. A missing file
    raises FileNotFoundError; a truncated, garbage or foreign file, a folder or an unreadable one
    raise ValueError, never safetensors' or the OS's own exception.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist; {fix}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        reason = getattr(e, "strerror", None) or (str(e).splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{what} {path!r} cannot be read ({reason}): it is truncated, damaged or not a "
                         f"safetensors file; {fix}") from None
    return meta, tensors


def encode(payload: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    return MAGIC + hashlib.sha256(body).hexdigest().encode() + b"\n" + body


def read_verified(path: str) -> bytes:
    """The bytes of the checkpoint file ``path`` after :func:`verify` passed on them."""
    with open(path, "rb") as f:
        data = f.read()
    verify(data, path)
    return data


def verify(data: bytes, name: str = "checkpoint") -> bytes:
    """Check the header and the SHA-256 of ``data``; return the payload bytes."""
    if not data.startswith(MAGIC):
        raise CorruptCheckpoint(f"{name} is not a sparsecomm checkpoint (bad header)")
    header_end = len(MAGIC) + 64
    digest, body = data[len(MAGIC):header_end].decode(errors="replace"), data[header_end + 1:]
    if hashlib.sha256(body).hexdigest() != digest:
        raise CorruptCheckpoint(f"{name} is truncated or corrupted: its SHA-256 does not match its contents")
    return body


def decode(data: bytes, name: str = "checkpoint") -> dict[str, Any]:
    """Verify the header and hash, then unpickle tensors and plain values only."""
    body = verify(data, name)
    return torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)


class CheckpointFolder:
    """``step-NNNNNNNN.ckpt`` files in one directory: save atomically, keep the last ``keep``.

    Keep-K only ever deletes this run's own checkpoints: the ones this folder object wrote and
    the ones it :meth:`adopt`-ed (the files of the run it resumes). A file that another run left
    in the folder, or that appears there meanwhile, is never deleted. What goes into a file, and
    when, is the caller's.
    """

    def __init__(self, directory: str, keep: int = 3):
        if keep < 1:
            raise ValueError(f"checkpoint.keep={keep} must be >= 1: the newest checkpoint is always kept")
        self.directory = directory
        self.keep = keep
        self.owned: set[int] = set()

    def path(self, step: int) -> str:
        return os.path.join(self.directory, f"step-{step:08d}.ckpt")

    def steps(self) -> list[int]:
        """Steps of the checkpoint files present, oldest first."""
        found = []
        for p in glob.glob(os.path.join(self.directory, "step-*.ckpt")):
            m = _NAME.search(os.path.basename(p))
            if m:
                found.append(int(m.group(1)))
        return sorted(found)

    def files(self) -> list[str]:
        """Paths of the checkpoint files present, oldest first."""
        return [self.path(step) for step in self.steps()]

    def remove_temporaries(self) -> None:
        """Delete the temporary files of writes a SIGKILL interrupted (call it when nothing writes here)."""
        if not os.path.isdir(self.directory):
            return
        for name in os.listdir(self.directory):
            if name.startswith(".tmp-") and name.endswith(".ckpt"):
                try:
                    os.unlink(os.path.join(self.directory, name))
                except OSError:
                    pass

    def adopt(self) -> None:
        """Count the files present as this run's (it resumes them): keep-K may delete them."""
        self.owned.update(self.steps())

    def save(self, step: int, payload: dict[str, Any]) -> str:
        return self.save_bytes(step, encode({**payload, "step": step}))

    def save_bytes(self, step: int, data: bytes) -> str:
        """Write :func:`encode`'s ``data`` as step ``step``'s file, then apply keep-K; its path."""
        path = self.path(step)
        write_atomic(path, data)
        self.owned.add(step)
        mine = [s for s in self.steps() if s in self.owned]
        for old in mine[:-self.keep]:
            os.unlink(self.path(old))
            self.owned.discard(old)
        return path

    def load_latest(self) -> dict[str, Any] | None:
        """The newest checkpoint that verifies, or None if there is none. Damaged ones are skipped
        with a warning naming them (they are left on disk for inspection)."""
        found = self.latest_verified()
        return decode(found[1], found[0]) if found is not None else None

    def latest_verified(self) -> tuple[str, bytes] | None:
        """``(path, raw bytes)`` of the newest checkpoint whose hash verifies, or None.

        The bytes are what :func:`decode` takes (a trainer broadcasts them to ranks that may not
        share this file system). Damaged files are skipped loudly (stderr and a warning).
        """
        for step in reversed(self.steps()):
            path = self.path(step)
            try:
                return path, read_verified(path)
            except (CorruptCheckpoint, EOFError, RuntimeError, OSError, ValueError) as e:
                msg = f"sparsecomm: skipping checkpoint {path}: {e}; falling back to the one before"
                print(msg, file=sys.stderr, flush=True)
                warnings.warn(msg, stacklevel=2)
        return None


CheckpointManager = CheckpointFolder  # the name docs/library.md and callers of the library use


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU and CUDA, NumPy, Python) as checkpointable values."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(int, np_state[2:4]),
                  float(np_state[4])],
        "python": _py_state_to_tensors(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(_py_state_from_tensors(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _py_state_to_tensors(st):
    version, internal, gauss = st
    return [version, torch.tensor(internal, dtype=torch.int64), gauss]


def _py_state_from_tensors(st):
    version, internal, gauss = st
    return (version, tuple(int(v) for v in internal.tolist()), gauss)
