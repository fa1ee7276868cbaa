"""The run directory: one run owns one folder, decided before anything is written.

:func:`claim` runs in the app's entry point, before Hydra writes ``.hydra/`` and before any
rank starts, in the process that owns the run (the bare launcher, or global rank 0):

* No fixed id (a bare run without ``run_id``): ``<out_dir>/<timestamp>``, created with
  ``os.mkdir``, which is atomic: a second run started in the same second gets
  ``<timestamp>_1``, a third ``<timestamp>_2``, ... Two runs never share a folder.
* A fixed id (``run_id=x``; torchrun's ``--rdzv-id`` through ``TORCHELASTIC_RUN_ID``; Slurm's
  job id) or an explicit ``hydra.run.dir``: that folder. What it already holds decides
  (:func:`verdict`):

  - nothing, or only what a failed start left (``.hydra/``): the run starts there;
  - the same job restarting (``TORCHELASTIC_RESTART_COUNT`` or ``SLURM_RESTART_COUNT`` > 0):
    it continues there (resuming from its checkpoints, if any); if it had already finished,
    there is nothing to do (:class:`AlreadyFinished`, exit 0), it is not trained again;
  - an unfinished run with checkpoints, and ``checkpoint.resume`` not ``never``: the run
    resumes it (that is how a crashed run is continued: the same command, the same run id);
  - anything else is another run's: a finished run (``summary.json``), a crashed run without
    checkpoints, or checkpoints with ``checkpoint.resume=never``. :class:`RunDirError` says
    so in one line, with the fix (a new ``run_id``). Nothing of the old run is touched.

One live run per folder: with ``create``, :func:`claim` takes the folder's lock
(:mod:`sparsecomm.app.runlock`, an ``flock`` the kernel drops when its holder dies) and judges the
folder again under it; the claim holds the lock until the run ends. A folder a live run holds is
refused in one line naming its holder (:func:`in_use_instead` puts that reason first); a dead
run's lock blocks nothing.

:func:`discard_if_empty` removes a folder this process created when the run failed before
writing anything but Hydra's ``.hydra/``, its first log lines and empty folders, so failed starts
leave no empty run directories. :func:`read_config_record` tells a damaged ``config.yaml`` (a
YAML list, empty, cut, binary) from a config: a damaged one decides nothing, the checkpoints do.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field as dataclass_field
from datetime import datetime

from omegaconf import DictConfig, OmegaConf

from sparsecomm.checkpoint import CheckpointFolder
from . import runlock

# Files a run writes into its folder (rank 0) once its checks passed; any of them means the folder holds a run.
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "model.safetensors", "mask.safetensors",
             "task_diff.safetensors", "base.safetensors")
FINISHED = "summary.json"
# Hydra's record of the command; the start's log lines; the lock file (runlock)
LEFT_BY_A_FAILED_START = (".hydra", "log.txt", runlock.LOCK_NAME)


class RunDirError(ValueError):
    """The run directory cannot be used by this run; the message names the folder and the fix."""


class AlreadyFinished(Exception):
    """A restart of a job whose run already finished: nothing to train (the app exits 0)."""


@dataclass(frozen=True)
class Claim:
    path: str
    created: bool  # this process made the folder (so it may remove it if the run fails at once)
    lock: runlock.FolderLock | None = dataclass_field(default=None, compare=False)  # held for the whole run

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def restart_count(environ: Mapping[str, str] | None = None) -> int:
    """How many times the launcher restarted this job: torchrun's attempts, Slurm's requeues."""
    environ = os.environ if environ is None else environ
    counts = []
    for var in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"):
        try:
            counts.append(int(environ.get(var, "0") or 0))
        except ValueError:
            counts.append(0)
    return max(counts)


def launcher_run_id(environ: Mapping[str, str] | None = None) -> str | None:
    """The id a launcher gives every process of one job: torchrun's rdzv id, Slurm's job id."""
    environ = os.environ if environ is None else environ
    rid = environ.get("TORCHELASTIC_RUN_ID", "")
    if rid and rid != "none":
        return rid
    if environ.get("SLURM_JOB_ID"):
        task = environ.get("SLURM_ARRAY_TASK_ID")
        return environ["SLURM_JOB_ID"] + (f"_{task}" if task else "")
    return None


def timestamp() -> str:
    return datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def checkpoint_files(directory: str) -> list[str]:
    """Names of the checkpoint files (``step-NNNNNNNN.ckpt``) in ``directory``, oldest first."""
    return [os.path.basename(path) for path in CheckpointFolder(directory).files()]


def verdict(path: str, checkpoint_dir: str, resume: str, restarts: int) -> str:
    """What the run may do with the existing folder ``path``: ``fresh`` | ``continue`` | ``finished``.

    Raises :class:`RunDirError` when the folder holds another run's results.
    """
    if not os.path.exists(path):
        return "fresh"
    if not os.path.isdir(path):
        raise RunDirError(f"run directory {path} is a file, not a folder; choose another out_dir or run_id")
    present = [n for n in RUN_FILES if os.path.exists(os.path.join(path, n))]
    checkpoints = checkpoint_files(checkpoint_dir)
    if not present and not checkpoints:
        return "fresh"
    if restarts > 0:
        return "finished" if FINISHED in present else "continue"
    fix = "start a new run with another run_id=... (with torchrun: another --rdzv-id), or delete the folder"
    if FINISHED in present:
        raise RunDirError(f"run directory {path} holds a finished run ({FINISHED}); a new run never writes into "
                          f"it: {fix}")
    if checkpoints and resume == "never":
        raise RunDirError(f"run directory {path} holds checkpoints of an earlier run ({checkpoints[-1]} in "
                          f"{checkpoint_dir}) and checkpoint.resume=never would mix two runs there: {fix}")
    if checkpoints:
        return "continue"  # resume=auto or a path: the crashed run continues from its checkpoints
    raise RunDirError(f"run directory {path} holds an unfinished run without checkpoints (its {', '.join(present)}); "
                      f"there is nothing to resume from: {fix}")


def checkpoint_dir(run_dir: str, checkpoint_cfg: Mapping | None) -> str:
    """``checkpoint.dir``, or ``<run dir>/checkpoints``: where a run's checkpoints live."""
    directory = (checkpoint_cfg or {}).get("dir")
    return os.path.abspath(str(directory) if directory else os.path.join(run_dir, "checkpoints"))


def _make_parent(out_dir: str, field: str) -> None:
    try:
        os.makedirs(out_dir, exist_ok=True)
    except FileExistsError:
        raise RunDirError(f"{field}={out_dir!r} is a file, not a folder; point {field} at a folder") from None
    except OSError as e:
        raise RunDirError(f"{field}={out_dir!r} cannot be created ({e.strerror}); point {field} at a writable "
                          f"folder") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise RunDirError(f"{field}={out_dir!r} is not writable; point {field} at a writable folder")


def _mkdir(path: str, field: str) -> bool:
    """``os.mkdir``: True if made, False if it exists; other failures name ``field``."""
    try:
        os.mkdir(path)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        raise RunDirError(f"{field}: cannot create the run directory {path} ({e.strerror}); point {field} at a "
                          f"writable folder") from None


def claim(out_dir: str, fixed_path: str | None, checkpoint_cfg: Mapping | None, *, field: str = "out_dir",
          create: bool = True, environ: Mapping[str, str] | None = None) -> Claim:
    """Decide (and with ``create``, make) this run's folder; see the module doc.

    ``fixed_path``: the folder a fixed id or ``hydra.run.dir`` names, or None for a fresh
    timestamped folder under ``out_dir``. Raises :class:`RunDirError` or :class:`AlreadyFinished`.
    """
    if fixed_path is None:
        if not create:
            return Claim(os.path.join(os.path.abspath(out_dir), timestamp()), False)
        _make_parent(out_dir, field)
        base = os.path.join(os.path.abspath(out_dir), timestamp())
        path, n = base, 0
        while not _mkdir(path, field):
            n += 1
            path = f"{base}_{n}"
        return Claim(path, True, _lock(path, True))
    path = os.path.abspath(fixed_path)
    resume = str((checkpoint_cfg or {}).get("resume", "auto"))
    state = verdict(path, checkpoint_dir(path, checkpoint_cfg), resume, restart_count(environ))
    if state == "finished":
        raise AlreadyFinished(f"sparsecomm: {path} already holds this job's finished run ({FINISHED}); "
                              f"a restart has nothing to train")
    if not create:
        return Claim(path, False)
    _make_parent(os.path.dirname(path), field)
    created = _mkdir(path, field)
    if not os.access(path, os.W_OK | os.X_OK):
        raise RunDirError(f"{field}: the run directory {path} is not writable; point {field} at a writable folder")
    lock = _lock(path, created)
    try:  # judged again under the lock: a run that ended meanwhile may have finished the folder
        verdict(path, checkpoint_dir(path, checkpoint_cfg), resume, restart_count(environ))
    except BaseException:
        lock.release()
        raise
    return Claim(path, created, lock)


def _lock(path: str, created: bool) -> runlock.FolderLock:
    """The folder's lock (:mod:`sparsecomm.app.runlock`); refused: the folder we made is removed again."""
    try:
        lock = runlock.acquire(path)
    except runlock.FolderInUse as e:
        if created:
            discard_if_empty(path)
        raise RunDirError(str(e)) from None
    lock.record_holder()
    return lock


def in_use_instead(path: str | None, error: RunDirError) -> RunDirError:
    """``error`` about the folder ``path``, unless a live run holds it: then that is the reason to say."""
    if path is not None and runlock.is_live(os.path.abspath(path)):
        return RunDirError(str(runlock.in_use_error(os.path.abspath(path))))
    return error


def holds_nothing(path: str, checkpoint_cfg: Mapping | None) -> bool:
    """Does the folder ``path`` hold nothing of a run (no run file, no checkpoint)? A run there starts afresh."""
    try:
        return verdict(path, checkpoint_dir(path, checkpoint_cfg), "auto", 0) == "fresh"
    except RunDirError:
        return False


def discard_if_empty(path: str) -> bool:
    """Remove ``path`` if it holds nothing but what a failed start leaves (and empty folders, such
    as the checkpoint folder made at start); True if removed."""
    try:
        names = os.listdir(path)
    except OSError:
        return False
    if any(n not in LEFT_BY_A_FAILED_START and not _empty_dir(os.path.join(path, n)) for n in names):
        return False
    shutil.rmtree(path, ignore_errors=True)
    return not os.path.exists(path)


def read_config_record(path: str, expected: Mapping) -> tuple[object | None, str]:
    """A run folder's ``config.yaml`` as a config, or ``(None, what is wrong with it)``: unreadable,
    not a mapping, or without fields of ``expected`` (a training config), as a file cut mid-way is."""
    try:
        saved = OmegaConf.load(path)
    except Exception as e:  # noqa: BLE001 - YAML, decoding, OmegaConf: the file is damaged, whichever it is
        return None, f"unreadable: {type(e).__name__}"
    if not isinstance(saved, DictConfig):
        return None, f"a YAML {type(saved).__name__.removesuffix('Config').lower() or 'value'}, not a mapping of fields"
    if len(saved) == 0:
        return None, "empty"
    missing = [k for k in _leaf_keys(expected) if OmegaConf.select(saved, k, default=_MISSING) is _MISSING]
    if missing:
        more = f" and {len(missing) - 1} more fields" if len(missing) > 1 else ""
        return None, f"incomplete, no {missing[0]}{more}"
    return saved, ""


_MISSING = object()


def _leaf_keys(d: Mapping, prefix: str = "") -> list[str]:
    out: list[str] = []
    for k, v in d.items():
        out += _leaf_keys(v, f"{prefix}{k}.") if isinstance(v, Mapping) and v else [f"{prefix}{k}"]
    return out


def _empty_dir(path: str) -> bool:
    try:
        return os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)
    except OSError:
        return False
