"""Fault tolerance for the trainer (config groups ``checkpoint`` and ``nonfinite``).

* :class:`Checkpoints`: where a run's checkpoints live, when they are due, and which one a run
  resumes from. Rank 0 writes (:class:`~sparsecomm.checkpoint.CheckpointManager`: temporary
  file, fsync, rename, keep the last K, SHA-256 verified on read); on resume rank 0 picks the
  newest file that verifies (skipping damaged ones loudly) and broadcasts its bytes, so ranks
  need not share a file system. What a checkpoint holds is :meth:`sparsecomm.trainer.Trainer.state_dict`.
* :func:`training_config` / :func:`training_hash`: the part of the config a resumed run must
  share with the run that wrote the checkpoint (everything but :data:`RESUME_FREE`).
* :class:`NonFiniteGuard`: counts steps skipped because the all-reduced gradient held NaN/Inf
  and stops the run after ``nonfinite.max_in_a_row`` of them in a row.

Over the network: resuming broadcasts one checkpoint from rank 0 (its size in bytes) and
all-gathers two short strings (config hash, mask digest); a checkpoint all-gathers every rank's
RNG state (a few kB per rank) to rank 0.
"""
from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from . import distributed as sdist
from .checkpoint import CheckpointManager, CorruptCheckpoint, decode, verify
from .fields import whole_number

FORMAT = 1
RESUME_MODES = ("auto", "never")
# Config fields a resumed run may change: where and how it runs, what it logs. Everything else
# (task, mask, schedule, optim, steps, batch_size, seed, comm) must match the checkpoint's.
RESUME_FREE = ("cluster", "checkpoint", "logging", "out_dir", "run_id", "num_workers", "eval_every",
               "eval_batch_size", "save_model", "nonfinite")


class CheckpointError(ValueError):
    """A checkpoint cannot be used by this run; the message names the file, the field and the fix."""


class NonFiniteGradients(ValueError):
    """Too many steps in a row whose all-reduced gradient held NaN/Inf; the message says what to change."""


# --- config ---------------------------------------------------------------------------------

def check_config(cfg: Mapping) -> None:
    """Check ``checkpoint.*`` and ``nonfinite.*``; errors name the field and the fix."""
    ck = cfg.get("checkpoint") or {}
    whole_number(ck.get("every", 0), "checkpoint.every", 0, error=CheckpointError)
    whole_number(ck.get("keep", 3), "checkpoint.keep", 1, error=CheckpointError)
    resume = ck.get("resume", "auto")
    if resume is None or str(resume).strip() == "":
        raise CheckpointError("checkpoint.resume is empty; use auto, never or the path of a checkpoint file or folder")
    if str(resume) not in RESUME_MODES and not os.path.exists(str(resume)):
        raise CheckpointError(
            f"checkpoint.resume={resume!r} is neither auto, never nor an existing checkpoint file or folder; "
            f"fix the path or use checkpoint.resume=auto")
    directory = ck.get("dir")
    if directory is not None and os.path.exists(str(directory)) and not os.path.isdir(str(directory)):
        raise CheckpointError(f"checkpoint.dir={directory!r} is a file, not a folder; point it at a folder")
    nf = cfg.get("nonfinite") or {}
    whole_number(nf.get("max_in_a_row", 5), "nonfinite.max_in_a_row", 1, error=CheckpointError)


def training_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config without :data:`RESUME_FREE`: what a resumed run must share."""
    container = OmegaConf.to_container(cfg, resolve=True)
    return {k: v for k, v in container.items() if k not in RESUME_FREE and k != "hydra"}


def training_hash(cfg: DictConfig) -> str:
    return hashlib.sha256(OmegaConf.to_yaml(OmegaConf.create(training_config(cfg)), sort_keys=True).encode()).hexdigest()


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

    def __init__(self, cfg: Mapping | None, run_dir: str):
        cfg = cfg or {}
        self.every = int(cfg.get("every", 0) or 0)
        self.keep = int(cfg.get("keep", 3))
        self.resume = str(cfg.get("resume", "auto"))
        self.directory = os.path.abspath(str(cfg.get("dir") or os.path.join(run_dir, "checkpoints")))
        self.manager = CheckpointManager(self.directory, keep=self.keep)

    def due(self, done: int, total: int) -> bool:
        return self.every > 0 and (done % self.every == 0 or done == total)

    def save(self, step: int, payload: dict[str, Any]) -> str | None:
        """Rank 0 writes ``step-NNNNNNNN.ckpt`` atomically; other ranks write nothing."""
        if not sdist.is_main_process():
            return None
        return self.manager.save(step, payload)

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
            if self.every > 0 and self.manager.steps():
                print(f"sparsecomm: checkpoint.resume=never: ignoring the checkpoints already in {self.directory} "
                      f"(steps {self.manager.steps()}); new ones go next to them, and a later checkpoint.resume=auto "
                      f"takes the highest step: use a fresh run_id or checkpoint.dir", file=sys.stderr, flush=True)
            return None
        if self.resume == "auto":
            found = self.manager.latest_verified()
            if found is None and self.manager.steps():
                raise CheckpointError(
                    f"no checkpoint in {self.directory} verifies (all truncated or corrupted); delete them or "
                    f"set checkpoint.resume=never to start afresh")
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
            with open(path, "rb") as f:
                data = f.read()
            verify(data, path)
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
        if sdist.is_initialized() and sdist.world_size() > 1:
            box = [message]
            dist.broadcast_object_list(box, src=0)
            message = box[0]
        kind, path, data = message
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
