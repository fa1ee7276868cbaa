"""A file the run cannot write is one line that names it: :func:`writing`.

Every file rank 0 writes into the run folder (``metrics.jsonl``, ``log.txt``, ``config.yaml``,
``mask.safetensors``, ``task_diff.safetensors``, ``base.safetensors``, ``model.safetensors``,
``summary.json``; checkpoints in :mod:`sparsecomm.app.checkpointing`) is written inside ``writing(path,
needed)``: an ``OSError`` (a full disk, a read-only file system, a folder where the file should
be) or safetensors' ``SafetensorError`` (which is not an OSError) becomes :class:`WriteError`::

    cannot write /runs/x/model.safetensors (No space left on device; 604.2 kB needed, 12.0 kB free there); ...

A failed write leaves no partial file behind (``cleanup``). The app prints the line once (exit
code 2) and then how to resume (:func:`sparsecomm.app.train.resume_hint`): the files written
before the failure and the checkpoints are intact. Nothing here crosses the network.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import save_model

from .units import human_bytes

PREFIX = "cannot write "


class WriteError(ValueError):
    """Rank 0 could not write a run file; ``str`` is the line for the user (path, reason, space).

    ``collective``: rank 0 prints it (other ranks raise it only when rank 0 tells them, with the same line).
    """

    collective = True


def is_write_failure(message: str) -> bool:
    """Is ``message`` (an error line, perhaps relayed from a worker) a failed write of a run file?"""
    return message.removeprefix("error: ").startswith(PREFIX)


def free_bytes(path: str) -> int | None:
    """Free bytes on the file system of ``path`` (its nearest existing folder), or None."""
    folder = os.path.abspath(path)
    while folder and not os.path.isdir(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error)
    found = re.search(r'message: "([^"]+)"', text)  # safetensors: IoError(Os { code: 28, ..., message: "..." })
    return found.group(1) if found else (text.splitlines()[0] if text else type(error).__name__)


def message(path: str, error: BaseException, needed: int | None = None) -> str:
    """The one line for a failed write of ``path``."""
    space = []
    if needed is not None:
        space.append(f"{human_bytes(needed)} needed")
    free = free_bytes(path)
    if free is not None:
        space.append(f"{human_bytes(free)} free there")
    detail = "; ".join([_reason(error), ", ".join(space)] if space else [_reason(error)])
    return (f"{PREFIX}{path} ({detail}); free space or make it writable: the files and checkpoints written "
            f"before are intact")


@contextlib.contextmanager
def writing(path: str, needed: int | None = None, cleanup: Iterable[str] = ()) -> Iterator[None]:
    """Run the write of ``path``; a failure raises :class:`WriteError` after removing ``cleanup``
    (temporary files the write may have left). ``needed``: the bytes the file takes, if known."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        for leftover in cleanup:
            with contextlib.suppress(OSError):
                os.unlink(leftover)
        raise WriteError(message(path, e, needed)) from None


def save_model_atomic(model: torch.nn.Module, path: str) -> None:
    """``model``'s weights as safetensors at ``path``: a temporary file renamed, so ``path`` is the
    whole file or absent; a failed write is one :class:`WriteError`."""
    needed = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    with writing(path, needed=needed, cleanup=[path + ".tmp"]):
        save_model(model, path + ".tmp")
        os.replace(path + ".tmp", path)


HYDRA_RECORD_BYTES = 64 * 1024  # Hydra's .hydra/ (config.yaml, hydra.yaml, overrides.yaml): a few kB


def check_room(folder: str, needed: int = HYDRA_RECORD_BYTES) -> None:
    """Before Hydra writes ``.hydra/`` into ``folder`` (which it does outside the app, with a traceback
    on failure): write and remove ``needed`` bytes there, or raise :class:`WriteError` naming it."""
    probe = os.path.join(folder, ".hydra")
    scratch = os.path.join(folder, ".room-check")
    with writing(probe, needed=needed, cleanup=[scratch]):
        with open(scratch, "wb") as f:
            f.write(b"\0" * needed)
            f.flush()
            os.fsync(f.fileno())
        os.unlink(scratch)
