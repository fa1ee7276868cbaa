"""Fault tolerance for the trainer (config groups ``checkpoint`` and ``nonfinite``).

* :class:`Checkpoints`: where a run's checkpoints live, when they are due, and which one a run
  resumes from. Rank 0 writes (:class:`~sparsecomm.checkpoint.CheckpointManager`: temporary
  file, fsync, rename, keep the last K, SHA-256 verified on read); on resume rank 0 picks the
  newest file that verifies (skipping damaged ones loudly) and broadcasts its bytes, so ranks
  need not share a file system. What a checkpoint holds is :meth:`sparsecomm.app.trainer.Trainer.state_dict`.
* A checkpoint records the training config (:func:`sparsecomm.app.config.training_config`: all but
  :data:`sparsecomm.app.config.RESUME_FREE`) and its hash (:func:`sparsecomm.app.config.config_hash`).
* :class:`NonFiniteGuard`: counts steps skipped because the all-reduced gradient held NaN/Inf
  and stops the run after ``nonfinite.max_in_a_row`` of them in a row.

Over the network: resuming broadcasts one checkpoint from rank 0 (its size in bytes) and
all-gathers two short strings (config hash, mask digest); a checkpoint all-gathers every rank's
RNG state (a few kB per rank) to rank 0.
"""
from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Mapping
from typing import Any

import torch
from omegaconf import DictConfig

from sparsecomm import distributed as sdist
from sparsecomm.checkpoint import CheckpointManager, CorruptCheckpoint, decode, encode, read_verified
from .rundir import restart_count


class CheckpointError(ValueError):
    """A checkpoint cannot be used by this run; the message names the file, the field and the fix.

    ``collective``: raised on every rank alike (rank 0 decides and tells the others), so one
    rank's line is enough.
    """

    collective = True


class NonFiniteGradients(ValueError):
    """Too many steps in a row whose all-reduced gradient held NaN/Inf; the message says what to change."""

    collective = True  # every rank sees the same all-reduced gradient


# --- config differences -----------------------------------------------------------------------
def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_differences(saved: Mapping, now: Mapping) -> list[str]:
    """``["mask.density=0.01 (checkpoint) vs 0.02 (this run)", ...]``, sorted by field."""
    a, b = _flatten(saved), _flatten(now)
    return [f"{k}={a.get(k, '<unset>')!r} (checkpoint) vs {b.get(k, '<unset>')!r} (this run)"
            for k in sorted(set(a) | set(b)) if a.get(k, "<unset>") != b.get(k, "<unset>")]


def model_signature(model: torch.nn.Module) -> dict[str, list[int]]:
    """Name -> shape of every parameter and buffer: tells a checkpoint of another model."""
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def signature_difference(saved: Mapping[str, list[int]], now: Mapping[str, list[int]]) -> str | None:
    for name in now:
        if name not in saved:
            return f"it has no tensor {name!r} of this model"
        if list(saved[name]) != list(now[name]):
            return f"{name!r} has shape {tuple(saved[name])} there but {tuple(now[name])} in this model"
    for name in saved:
        if name not in now:
            return f"its tensor {name!r} is not in this model"
    return None


# --- checkpoints ----------------------------------------------------------------------------

class Checkpoints:
    """The run's checkpoint folder (``checkpoint.dir``, default ``<run dir>/checkpoints``).

    ``checkpoint.every=N``: a checkpoint after every N-th step and after the last (0: none).
    ``checkpoint.resume``: ``auto`` (newest valid checkpoint in the folder if any, else start
    fresh), ``never``, or the path of a checkpoint file or folder (must load, else an error).
    """

    def __init__(self, cfg: DictConfig, run_dir: str):
        self.every = int(cfg.every)
        self.keep = int(cfg.keep)
        self.resume = str(cfg.resume)
        self.directory = os.path.abspath(str(cfg.dir or os.path.join(run_dir, "checkpoints")))
        self.manager = CheckpointManager(self.directory, keep=self.keep)

    def due(self, done: int, total: int) -> bool:
        return self.every > 0 and (done % self.every == 0 or done == total)

    def check_writable(self) -> None:
        """Rank 0, at start: the folder can be made and written, or a one-line error now (not at step N)."""
        if self.every <= 0:
            return
        try:
            os.makedirs(self.directory, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.directory):
                pass
        except OSError as e:
            raise CheckpointError(f"checkpoint.dir={self.directory!r} is not writable ({e.strerror}); point "
                                  f"checkpoint.dir at a writable folder or set checkpoint.every=0") from None

    def save(self, step: int, payload_of) -> str | None:
        """Collective: rank 0 writes ``step-NNNNNNNN.ckpt`` atomically; returns its path on rank 0.

        ``payload_of()`` builds the payload (itself collective). A failed write (a full disk, a
        folder made read-only) leaves the previous checkpoints as they were and stops every rank
        with a :class:`CheckpointError` naming the path and the free space.
        """
        payload = payload_of()
        written: list[str] = []

        def write() -> None:
            data = encode({**payload, "step": step})
            try:
                written.append(self.manager.save_bytes(step, data))
            except OSError as e:
                free = _free_bytes(self.directory)
                raise CheckpointError(
                    f"cannot write checkpoint {self.manager.path(step)} ({e.strerror}; {len(data) / 1e6:.1f} MB "
                    f"needed, {free / 1e6:.1f} MB free there); the earlier checkpoints are intact: free space or "
                    f"point checkpoint.dir at another folder, then resume") from None

        sdist.rank0_decides(write, CheckpointError)
        return written[0] if written else None

    def _remove_temporaries(self) -> None:
        """Temporary files of writes a SIGKILL interrupted (nothing else writes here at start-up)."""
        if os.path.isdir(self.directory):
            for name in os.listdir(self.directory):
                if name.startswith(".tmp-") and name.endswith(".ckpt"):
                    try:
                        os.unlink(os.path.join(self.directory, name))
                    except OSError:
                        pass

    def _find(self) -> tuple[str, bytes] | None:
        """Rank 0: the checkpoint to resume from per ``checkpoint.resume`` (raises CheckpointError)."""
        if self.resume == "never":
            present = self.manager.steps()
            if present and restart_count() == 0:
                raise CheckpointError(
                    f"checkpoint.dir {self.directory} holds checkpoints of another run (steps {present}); "
                    f"checkpoint.resume=never would mix two runs there: start a new run with another run_id=... "
                    f"(a fresh folder), or point checkpoint.dir at an empty folder")
            return None
        if self.resume == "auto":
            found = self.manager.latest_verified()
            if found is None and self.manager.steps():
                raise CheckpointError(
                    f"no checkpoint in {self.directory} verifies (all truncated or corrupted); delete them, or "
                    f"start a new run with another run_id=...")
            self.manager.adopt()  # the run continues here: its files are this run's
            return found
        path = self.resume
        if os.path.isdir(path):
            found = CheckpointManager(path).latest_verified()
            if found is None:
                raise CheckpointError(
                    f"checkpoint.resume={path!r} holds no checkpoint that verifies; point it at another "
                    f"folder or file, or use checkpoint.resume=never")
            return found
        try:
            data = read_verified(path)
        except (OSError, CorruptCheckpoint) as e:
            raise CheckpointError(f"checkpoint.resume={path!r} cannot be used: {e}; point it at another "
                                  f"checkpoint or use checkpoint.resume=auto") from None
        return path, data

    def fetch(self) -> tuple[str, dict[str, Any]] | None:
        """Collective: ``(path, payload)`` of the checkpoint to resume from, on every rank, or None.

        Rank 0 chooses and verifies the file, then broadcasts its bytes (one object broadcast of
        the checkpoint's size); each rank verifies the hash again and unpickles tensors only.
        """
        if sdist.is_main_process():
            self._remove_temporaries()
            try:
                found = self._find()
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


def _free_bytes(directory: str) -> int:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return 0


# --- non-finite gradients -------------------------------------------------------------------

class NonFiniteGuard:
    """Skip steps whose all-reduced gradient held NaN/Inf (the same verdict on every rank).

    ``skipped``: steps skipped so far; ``in_a_row``: the current streak. The run stops with
    :class:`NonFiniteGradients` when the streak reaches ``max_in_a_row``.
    """

    def __init__(self, max_in_a_row: int = 5):
        self.max_in_a_row = int(max_in_a_row)
        self.skipped = 0
        self.in_a_row = 0
        self.last_skipped = False

    def check(self, bad: bool, step: int) -> bool:
        """Record step ``step``'s verdict; True if the step must be skipped."""
        self.last_skipped = bool(bad)
        if not bad:
            self.in_a_row = 0
            return False
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteGradients(
                f"step {step}: the all-reduced gradient held NaN/Inf for {self.in_a_row} steps in a row "
                f"(nonfinite.max_in_a_row={self.max_in_a_row}, {self.skipped} skipped in all); lower optim.lr / "
                f"optim.dense_lr, check the data, or raise nonfinite.max_in_a_row")
        return True

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.skipped, self.in_a_row = int(state["skipped"]), int(state["in_a_row"])


# --- stopping on a signal -------------------------------------------------------------------

class Interrupted(Exception):
    """The run stopped at a step boundary on a signal (:class:`StopOnSignal`); ``str`` is the line for the user.

    Raised on every rank at the same step (``collective``). ``exit_code`` is 128 + the signal's
    number, as a shell reports a process ended by that signal.
    """

    collective = True

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = int(signum)
        self.exit_code = 128 + int(signum)


class StopOnSignal:
    """SIGINT, SIGTERM, SIGHUP and SIGQUIT ask the run to stop at the next step boundary instead of killing it.

    Slurm sends SIGTERM before it kills a job at its time limit (and on ``scancel``); a closed
    terminal sends SIGHUP; torchrun and the app's own launcher pass all four on to every worker
    (torch elastic's ``signals_to_handle``). The handler only records the
    first signal (the terminal and the launcher both deliver a Ctrl-C: one request). The trainer
    asks :meth:`requested` at each step; ranks agree on it inside the loss all-reduce of each log
    step (``logging.log_every``), so every rank stops at the same step without an extra collective,
    writes a checkpoint if checkpoints are on, and raises :class:`Interrupted`.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)

    def __init__(self, install: bool = True):
        self.signum = 0
        self._previous: dict[int, Any] = {}
        if install and threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if not self.signum:
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum != 0

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def interrupted(signum: int | None, done: int, total: int, checkpoints: Checkpoints, saved: str | None,
                save: Callable[[], str | None], log) -> Interrupted:
    """The run stops at step ``done`` on a signal (collective: every rank at the same step):
    a checkpoint if they are on and none was written at this step, a log record, and the
    :class:`Interrupted` to raise. ``signum`` None: this rank got none and stops with its peers."""
    signum = signum or int(signal.SIGTERM)
    if checkpoints.every > 0 and saved is None:
        saved = save()
    if checkpoints.every > 0:
        kept = f"checkpoint {saved} written" if sdist.is_main_process() else "checkpoint written"
    else:
        kept = "no checkpoint (checkpoint.every=0)"
    log.log("interrupted", done, signal=signal_name(signum), checkpoint=saved)
    return Interrupted(f"interrupted by {signal_name(signum)} at step {done} of {total}; {kept}", signum)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
