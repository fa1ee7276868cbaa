"""The run folder of one command: named, claimed and checked before Hydra writes into it.

The app's entry point (:mod:`sparsecomm.app.train`) composes the config once, then
:func:`claim_run_dir` decides the folder (:mod:`sparsecomm.app.rundir`: what a folder may hold,
:mod:`sparsecomm.app.runlock`: one live run per folder) and the entry point hands its path to Hydra
as the value of ``hydra.run.dir`` / ``hydra.sweep.dir``. When the command fails,
:func:`report_failure` says how to go on (:func:`resume_hint`: a command to paste,
:mod:`sparsecomm.app.hints`). Nothing here crosses the network.

``conf/train.yaml`` names the folder Hydra would pick without a claim (an interpolation only Hydra
resolves, or ``--cfg``) through the resolvers ``sc_run_id``, ``sc_run_dir`` and ``sc_sweep_dir``:
pure functions of the config and the launcher's environment (:func:`run_id`).
"""
from __future__ import annotations

import os
import sys

from omegaconf import DictConfig, OmegaConf

from . import hints, rundir, runlock, sweep, writes
from .compose import parse_overrides
from .config import training_config
from .checkpointing import config_differences
from .launch import env_rank


def run_id(explicit: str | None = None) -> str:
    """The name of the run directory that every rank of one run computes the same.

    ``run_id=...`` if given, else the launcher's run id (``TORCHELASTIC_RUN_ID``, which torchrun
    sets from ``--rdzv_id``; ``SLURM_JOB_ID``), else a timestamp. A timestamp is only a first
    guess: :func:`claim_run_dir` claims the folder and adds a suffix if another run took that name
    in the same second.
    """
    return str(explicit) if explicit else (rundir.launcher_run_id() or rundir.timestamp())


for _name, _fn in (("sc_run_id", lambda explicit=None: run_id(explicit)),
                   ("sc_run_dir", lambda out_dir, explicit=None: os.path.join(str(out_dir), run_id(explicit))),
                   ("sc_sweep_dir", lambda out_dir, explicit=None: os.path.join(str(out_dir), "multirun",
                                                                                run_id(explicit)))):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn, use_cache=True)


def claim_run_dir(cfg: DictConfig, overrides: list[str], *, multirun: bool, create: bool) -> rundir.Claim | None:
    """Decide this run's folder before Hydra writes into it (``sparsecomm.app.rundir``); None: Hydra's choice.

    With ``create`` (the process that owns the run) the folder's lock is taken and held in the
    returned claim (:mod:`sparsecomm.app.runlock`); a folder a live run holds is refused as such.
    """
    explicit_dir = None
    for o in parse_overrides(overrides):
        if o.key_or_group == ("hydra.sweep.dir" if multirun else "hydra.run.dir") and not o.is_delete():
            explicit_dir = str(o.value())
    if explicit_dir is not None and "${" in explicit_dir:
        return None  # an interpolation only Hydra can resolve: Hydra's folder, unchecked
    rid = str(cfg.run_id) if cfg.run_id else rundir.launcher_run_id()
    out_dir = os.path.join(str(cfg.out_dir), "multirun") if multirun else str(cfg.out_dir)
    fixed = explicit_dir or (os.path.join(out_dir, rid) if rid else None)
    field = ("hydra.sweep.dir" if multirun else "hydra.run.dir") if explicit_dir else "out_dir"
    try:
        if multirun:
            claim = _claim_sweep_dir(out_dir, fixed, field, create)
        else:
            rundir.claim(out_dir, fixed, cfg.checkpoint, field=field, create=False)  # refuses another run's folder
            if fixed is not None:
                check_same_training_config(fixed, cfg)
            claim = rundir.claim(out_dir, fixed, cfg.checkpoint, field=field, create=create)
    except rundir.RunDirError as e:
        raise (rundir.in_use_instead(fixed, e) if create else e) from None
    if create and claim is not None:
        try:
            writes.check_room(claim.path)  # Hydra's .hydra/ is written before the app runs
        except writes.WriteError:
            claim.release()
            if claim.created:
                rundir.discard_if_empty(claim.path)
            raise
    return claim


def _claim_sweep_dir(out_dir: str, fixed: str | None, field: str, create: bool) -> rundir.Claim | None:
    """A sweep's folder holds its jobs' folders: a fixed one must be new or empty (its lock aside)."""
    def refuse_earlier_sweep(path: str) -> None:
        if os.path.isdir(path) and [n for n in os.listdir(path) if n != runlock.LOCK_NAME]:
            raise rundir.RunDirError(f"sweep directory {os.path.abspath(path)} holds an earlier sweep; start this "
                                     f"one with another run_id=..., or delete the folder")

    if fixed is not None:
        refuse_earlier_sweep(fixed)
    if not create:
        return None
    claim = rundir.claim(out_dir, fixed, None, field=field, create=True)
    try:
        refuse_earlier_sweep(claim.path)  # again, under the lock
    except rundir.RunDirError:
        claim.release()
        raise
    return claim


def check_same_training_config(path: str, cfg: DictConfig) -> None:
    """A run continued in ``path`` must keep the training config its ``config.yaml`` records.

    Checked here, before Hydra rewrites ``.hydra/`` there: a refused resume leaves the folder's
    record as it was. The checkpoint's own config is checked again when it is loaded. A damaged
    ``config.yaml`` (not a mapping, cut, unreadable) decides nothing: the checkpoint, which records
    its config and verifies by hash, does; the resumed run writes ``config.yaml`` again.
    """
    saved_path = os.path.join(path, "config.yaml")
    if not os.path.isfile(saved_path) or str(cfg.checkpoint.resume) == "never":
        return
    saved, damage = rundir.read_config_record(saved_path, training_config(cfg))
    if saved is None:
        if env_rank() in (None, 0):  # every rank reads it; the owner of the folder says so
            print(f"sparsecomm: {saved_path} is damaged ({damage}); the checkpoint's own config decides whether this "
                  f"run may resume, and config.yaml is written again", file=sys.stderr, flush=True)
        return
    diffs = config_differences(training_config(saved), training_config(cfg))
    if diffs:
        raise rundir.RunDirError(
            f"run directory {os.path.abspath(path)} holds a run with another config: {'; '.join(diffs[:3])}"
            f"{' ...' if len(diffs) > 3 else ''}; to resume it, rerun with its values (its config.yaml), or start "
            f"a new run with another run_id=...")


def resume_hint(path: str, overrides: list[str], checkpoint_cfg, options: list[str] | tuple = ()) -> str:
    """How to continue the run in ``path`` after a crash, an interruption or a failed write: a
    command to paste (shell- and Hydra-quoted, :mod:`sparsecomm.app.hints`); under Slurm or torchrun
    the launcher's command with the run id to pass. ``options``: Hydra options (``--config-name x``)."""
    if rundir.holds_nothing(path, checkpoint_cfg):
        return "nothing of the run was kept, so the same command starts it again"
    if not rundir.checkpoint_files(rundir.checkpoint_dir(path, checkpoint_cfg)):
        every = (checkpoint_cfg or {}).get("every", 0)
        return (f"no checkpoint was written (checkpoint.every={every}), so there is nothing to resume: start a new "
                f"run with another run_id=... (or delete the folder); set checkpoint.every=N to make a run resumable")
    return hints.resume_command(path, overrides, options)


def report_failure(claim: rundir.Claim, multirun: bool, overrides: list[str], options: list[str],
                   checkpoint_cfg, resumable: bool) -> None:
    """A sweep says what happened to each job; a failed start leaves no empty folder; a run that
    crashed, was interrupted or could not write a file (``resumable``) says how to resume."""
    if multirun:
        sweep.report(claim.path, overrides)
        return
    if claim.created and rundir.discard_if_empty(claim.path):
        return
    if resumable and os.path.isdir(claim.path):
        print(f"sparsecomm: run directory {claim.path}; {resume_hint(claim.path, overrides, checkpoint_cfg, options)}",
              file=sys.stderr, flush=True)
