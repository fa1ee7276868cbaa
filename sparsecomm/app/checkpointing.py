"""The run's checkpoints as one component (config group ``checkpoint``), in torchtitan's shape.

:class:`CheckpointManager` holds a dict of named ``Stateful`` components (``state_dict`` /
``load_state_dict``) it knows nothing about, a header (what the run that writes is: step, world
size, and what ``header()`` adds) and a check of a checkpoint's header (``validate``). It decides
where the files live (``checkpoint.dir``), when one is due (``checkpoint.every``), which one a run
resumes from (``checkpoint.resume``: ``auto`` | ``never`` | a file or folder) and how many stay
(``checkpoint.keep``, keep-K of this run's own files only). Rank 0 writes atomically (temporary
file, fsync, rename: :class:`sparsecomm.checkpoint.CheckpointFolder`); a SHA-256 over the payload
is checked on every read. :class:`TrainingHeader` is the trainer's header and check: the training
config and its hash, the model's tensor shapes.

Over the network: a save runs every component's ``state_dict`` on every rank (those that gather
per-rank state all-gather it; see :mod:`sparsecomm.app.run_state`) and broadcasts rank 0's verdict
on the write (a short string); a resume broadcasts the chosen checkpoint's bytes from rank 0 (its
size), so ranks need no shared file system.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
from omegaconf import DictConfig

from sparsecomm import distributed as sdist
from sparsecomm.checkpoint import CheckpointFolder, CorruptCheckpoint, decode, encode, read_verified
from .config import training_config
from .rundir import checkpoint_dir, restart_count

FORMAT = 2  # 1: the trainer's hand-written dict (before named components)
FIX = ("start a new run with another run_id=... (a fresh folder), or point checkpoint.resume at checkpoints "
       "of this model and config")


class CheckpointError(ValueError):
    """A checkpoint cannot be written or used by this run; the message names the file, the field and the fix.

    ``collective``: raised on every rank alike (rank 0 decides and tells the others), so one
    rank's line is enough.
    """

    collective = True


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, sd: Any) -> None: ...


class CheckpointManager:
    """``step-NNNNNNNN.ckpt`` files of named components under a header; see the module doc.

    ``states``: name -> component, saved and loaded in this order (a dict the owner may fill
    after construction, before the first save or resume). ``header()``: fields every
    checkpoint records beside ``format``, ``step`` and ``world_size`` (the manager's own).
    On resume, ``prepare(header)`` runs first (e.g. a mask kind rebuilds the model a checkpoint
    of its phase holds), then ``validate(header, path)``, which raises :class:`CheckpointError`
    when this run may not load it, then the components load. A component's ``ValueError`` while
    loading becomes a :class:`CheckpointError` naming the file.
    """

    def __init__(self, cfg: DictConfig | Mapping, run_dir: str, *, states: Mapping[str, Stateful] | None = None,
                 header: Callable[[], Mapping[str, Any]] = dict,
                 validate: Callable[[Mapping[str, Any], str], None] = lambda header, source: None,
                 prepare: Callable[[Mapping[str, Any]], None] = lambda header: None):
        self.every = int(cfg["every"])
        self.keep = int(cfg["keep"])
        self.policy = str(cfg["resume"])
        self.directory = checkpoint_dir(run_dir, cfg)
        self.folder = CheckpointFolder(self.directory, keep=self.keep)
        self.states = dict(states or {})
        self.header, self.validate, self.prepare = header, validate, prepare
        self.saved_step: int | None = None  # the step of the last checkpoint this run wrote (every rank)
        self.last_path: str | None = None   # its path (rank 0; None on the others)

    # -- writing ---------------------------------------------------------------------------------
    def due(self, done: int, total: int) -> bool:
        """Is a checkpoint due after step ``done`` of ``total``? (every N-th step and the last one)"""
        return self.every > 0 and (done % self.every == 0 or done == total)

    def check_writable(self) -> None:
        """Collective, at start: the folder can be made and written, or a one-line error now (not at step N)."""
        sdist.rank0_decides(self._check_writable, CheckpointError)

    def _check_writable(self) -> None:
        if self.every <= 0:
            return
        try:
            os.makedirs(self.directory, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.directory):
                pass
        except OSError as e:
            raise CheckpointError(f"checkpoint.dir={self.directory!r} is not writable ({e.strerror}); point "
                                  f"checkpoint.dir at a writable folder or set checkpoint.every=0") from None

    def state_dict(self, step: int) -> dict[str, Any]:
        """Collective: the checkpoint of step ``step`` as one dict (header fields, ``state``: every component's)."""
        return {"format": FORMAT, "step": int(step), "world_size": sdist.world_size(), **self.header(),
                "state": {name: part.state_dict() for name, part in self.states.items()}}

    def save(self, step: int) -> str | None:
        """Collective: rank 0 writes ``step-NNNNNNNN.ckpt`` atomically, then keep-K; its path on rank 0.

        A failed write (a full disk, a folder made read-only) leaves the earlier checkpoints as they
        were and stops every rank with a :class:`CheckpointError` naming the path and the free space.
        """
        payload = self.state_dict(step)
        written: list[str] = []

        def write() -> None:
            data = encode(payload)
            try:
                written.append(self.folder.save_bytes(step, data))
            except OSError as e:
                raise CheckpointError(
                    f"cannot write checkpoint {self.folder.path(step)} ({e.strerror}; {len(data) / 1e6:.1f} MB "
                    f"needed, {_free_bytes(self.directory) / 1e6:.1f} MB free there); the earlier checkpoints are "
                    f"intact: free space or point checkpoint.dir at another folder, then resume") from None

        sdist.rank0_decides(write, CheckpointError)
        self.saved_step, self.last_path = int(step), (written[0] if written else None)
        return self.last_path

    def written_at(self, step: int) -> bool:
        """Did this run write the checkpoint of step ``step`` last? (the same answer on every rank)"""
        return self.saved_step == int(step)

    # -- resuming --------------------------------------------------------------------------------
    def resume(self) -> tuple[int, str, dict[str, Any]] | None:
        """Collective: load the checkpoint ``checkpoint.resume`` names into the components, if any.

        Returns ``(step, path, header)`` (``header``: the checkpoint's fields but its components'
        states, and ``components``: the names it holds), or None when the run starts afresh.
        """
        found = self._fetch()
        if found is None:
            return None
        path, sd = found
        if not isinstance(sd, dict) or sd.get("format") != FORMAT:
            got = sd.get("format") if isinstance(sd, dict) else type(sd).__name__
            raise CheckpointError(f"{path} has format {got!r}, not {FORMAT}; {FIX}")
        missing = [k for k in ("step", "world_size", "state", *self.header()) if k not in sd]
        if missing or not isinstance(sd["state"], dict):
            raise CheckpointError(f"{path} lacks its {(missing or ['state'])[0]!r} field; {FIX}")
        header = {**{k: v for k, v in sd.items() if k != "state"}, "components": list(sd["state"])}
        self.prepare(header)
        self.validate(header, path)
        try:
            for name, part in self.states.items():
                if name in sd["state"]:
                    part.load_state_dict(sd["state"][name])
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}; {FIX}") from None
        return int(sd["step"]), path, header

    def _fetch(self) -> tuple[str, Any] | None:
        """Collective: ``(path, payload)`` of the checkpoint to resume from, on every rank, or None.

        Rank 0 chooses and verifies the file, then broadcasts its bytes (one object broadcast of
        the checkpoint's size); each rank verifies the hash again and unpickles tensors only.
        """
        if sdist.is_main_process():
            self.folder.remove_temporaries()  # of writes a SIGKILL interrupted: nothing else writes here now
            try:
                found = self._choose()
                message = ("ok", *found) if found is not None else ("none", None, None)
            except CheckpointError as e:
                message = ("error", str(e), None)
        else:
            message = None
        kind, path, data = sdist.broadcast_from_rank0(message)
        if kind == "error":
            raise CheckpointError(path)
        if kind == "none":
            return None
        try:
            return path, decode(data, path)
        except Exception as e:  # noqa: BLE001 - an unpicklable or foreign payload is a user-level error
            raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}); point checkpoint.resume at "
                                  f"another checkpoint or use checkpoint.resume=never") from None

    def _choose(self) -> tuple[str, bytes] | None:
        """Rank 0: ``(path, verified bytes)`` per ``checkpoint.resume``, or None (raises CheckpointError)."""
        if self.policy == "never":
            present = self.folder.steps()
            if present and restart_count() == 0:
                raise CheckpointError(
                    f"checkpoint.dir {self.directory} holds checkpoints of another run (steps {present}); "
                    f"checkpoint.resume=never would mix two runs there: start a new run with another run_id=... "
                    f"(a fresh folder), or point checkpoint.dir at an empty folder")
            return None
        if self.policy == "auto":
            found = self.folder.latest_verified()
            if found is None and self.folder.steps():
                raise CheckpointError(
                    f"no checkpoint in {self.directory} verifies (all truncated or corrupted); delete them, or "
                    f"start a new run with another run_id=...")
            self.folder.adopt()  # the run continues here: its files are this run's (keep-K may delete them)
            return found
        path = self.policy
        if os.path.isdir(path):
            found = CheckpointFolder(path).latest_verified()
            if found is None:
                raise CheckpointError(
                    f"checkpoint.resume={path!r} holds no checkpoint that verifies; point it at another "
                    f"folder or file, or use checkpoint.resume=never")
            return found
        try:
            return path, read_verified(path)
        except (OSError, CorruptCheckpoint) as e:
            raise CheckpointError(f"checkpoint.resume={path!r} cannot be used: {e}; point it at another "
                                  f"checkpoint or use checkpoint.resume=auto") from None


class TrainingHeader:
    """What a trainer's checkpoint records of its run, and whether this run may load one.

    ``header()``: the training config (:func:`sparsecomm.app.config.training_config`: all but the
    fields a resume may change), its hash, and every model tensor's name and shape. A checkpoint of
    another model or another training config is refused in one line naming the first difference.
    """

    def __init__(self, cfg: DictConfig, config_hash: str, get_model: Callable[[], torch.nn.Module]):
        self.config, self.config_hash, self.get_model = training_config(cfg), config_hash, get_model

    def __call__(self) -> dict[str, Any]:
        return {"config": self.config, "config_hash": self.config_hash,
                "model_signature": model_signature(self.get_model())}

    def validate(self, header: Mapping[str, Any], source: str) -> None:
        why = signature_difference(header["model_signature"], model_signature(self.get_model()))
        if why is not None:
            raise CheckpointError(f"{source} is a checkpoint of another model: {why}; {FIX}")
        if header["config_hash"] != self.config_hash:
            diffs = config_differences(header["config"], self.config)
            raise CheckpointError(f"{source} was written with another config: {'; '.join(diffs[:3]) or 'hash differs'}; "
                                  f"rerun with the checkpoint's values, or {FIX}")


def model_signature(model: torch.nn.Module) -> dict[str, list[int]]:
    """Name -> shape of every parameter and buffer: tells a checkpoint of another model."""
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def signature_difference(saved: Mapping[str, list[int]], now: Mapping[str, list[int]]) -> str | None:
    """The first difference between two :func:`model_signature`\\ s, in words, or None."""
    for name in now:
        if name not in saved:
            return f"it has no tensor {name!r} of this model"
        if list(saved[name]) != list(now[name]):
            return f"{name!r} has shape {tuple(saved[name])} there but {tuple(now[name])} in this model"
    for name in saved:
        if name not in now:
            return f"its tensor {name!r} is not in this model"
    return None


def config_differences(saved: Mapping, now: Mapping) -> list[str]:
    """``["mask.density=0.01 (checkpoint) vs 0.02 (this run)", ...]``, sorted by field."""
    a, b = _flatten(saved), _flatten(now)
    return [f"{k}={a.get(k, '<unset>')!r} (checkpoint) vs {b.get(k, '<unset>')!r} (this run)"
            for k in sorted(set(a) | set(b)) if a.get(k, "<unset>") != b.get(k, "<unset>")]


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _free_bytes(directory: str) -> int:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return 0
