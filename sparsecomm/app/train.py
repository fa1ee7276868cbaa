"""``sparsecomm-train`` (also ``python -m sparsecomm.app.train``): the Hydra app.

    sparsecomm-train                                   # 2 Gloo workers, FISH mask, digits
    sparsecomm-train mask.density=0.02 steps=200       # any config value
    sparsecomm-train mask=random schedule=refresh      # any config group option
    torchrun --nproc_per_node 4 -m sparsecomm.app.train cluster=single_node_gpu

Run bare, the app starts its own workers (``cluster``: nnodes x nproc_per_node, torch's
elastic launch API) and hands them the composed config and the run directory. Started by
torchrun or Slurm, it takes its rank from the environment and starts nothing
(:mod:`sparsecomm.app.launch`).

A bad override, value or input ends in ONE line ``error: ...`` on stderr and exit code 2, never
a traceback (``SPARSECOMM_TRACEBACK=1`` shows it): the config is composed and checked before Hydra
runs the app (:func:`sparsecomm.app.compose.preflight`). Configs live in ``conf/``, installed as the
package ``sparsecomm.conf`` (each option a YAML over its schema, :mod:`sparsecomm.app.schema`), so
the app works from a checkout and from a plain ``pip install``.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from typing import Any

import hydra
from hydra._internal.utils import get_args_parser
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import sparsecomm
from sparsecomm.distributed import RankDisagreement

from . import hints, launch, rundir, runlock, sweep, trainer, writes
from .compose import CONFIG_MODULE, CONFIG_NAME, _parse_overrides, compose_config, config_groups, preflight  # noqa: F401
from .config import check_config, training_config
from .checkpointing import config_differences
from .signals import Interrupted
from .launch import WorkerFailed, WorkerUserError, env_rank, record_worker_error
from .peers import PEER_LOST_RECORD, PeerLost

USER_ERROR_EXIT = 2
PEER_LOST_EXIT = 3  # a peer (rank, node, the job's store) stopped answering for cluster.timeout_s
_T0 = time.time()


def run_id(explicit: str | None = None) -> str:
    """The name of the run directory that every rank of one run computes the same.

    ``run_id=...`` if given, else the launcher's run id (``TORCHELASTIC_RUN_ID``, which torchrun
    sets from ``--rdzv_id``; ``SLURM_JOB_ID``), else a timestamp. A timestamp is only a first
    guess: :func:`main` claims the folder (``sparsecomm.app.rundir``) and adds a suffix if another run
    took that name in the same second.
    """
    return str(explicit) if explicit else (rundir.launcher_run_id() or rundir.timestamp())


# The folders main() claimed in this process ("run", "sweep"); Hydra's run/sweep dir resolve to them.
_CLAIMED: dict[str, str] = {}
_OVERRIDES: list[str] = []  # this command's overrides, for the resume command a stopped run prints


def _run_dir(out_dir: str, explicit: str | None = None) -> str:
    return _CLAIMED.get("run") or os.path.join(str(out_dir), run_id(explicit))


def _sweep_dir(out_dir: str, explicit: str | None = None) -> str:
    return _CLAIMED.get("sweep") or os.path.join(str(out_dir), "multirun", run_id(explicit))


for _name, _fn in (("sc_run_id", lambda explicit=None: run_id(explicit)), ("sc_run_dir", _run_dir),
                   ("sc_sweep_dir", _sweep_dir)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn, use_cache=True)


# --- errors a user can fix: one line, exit 2 ------------------------------------------------------

_LAST_ERROR: dict[str, str] = {}  # the last error line this process reported ("line"): what failed


def _user_error_types() -> tuple[type[BaseException], ...]:
    # OSError last: a file or folder the run cannot read or write (named in the line), not a bug.
    return (ValueError, FileNotFoundError, NotADirectoryError, ImportError, RankDisagreement,
            WorkerUserError, HydraException, OmegaConfBaseException, OSError)


def one_line(exc: BaseException) -> str:
    """The user-facing message of ``exc`` on one line (Hydra's multi-line errors condensed)."""
    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file:
        group, _, option = str(exc.missing_cfg_file).rpartition("/")
        options = ", ".join(exc.options or [])
        if group:
            return (f"{group}={option}: no such option in config group '{group}'"
                    + (f"; choose one of: {options}" if options else ""))
        return f"config '{option}' not found" + (f"; choose one of: {options}" if options else "")
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}; check the path in the config (out_dir, task.data_dir, mask.path, ...)"
    text = str(exc).strip() or type(exc).__name__
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("full_key:", "object_type=", "reference_type=", "Config search path",
                                        "Set the environment variable HYDRA_FULL_ERROR")):
            continue
        lines.append(line)
    message = " ".join(lines)
    cause = exc.__cause__ or exc.__context__
    if cause is not None and type(exc).__module__.startswith("hydra") and str(cause).strip():
        message += ": " + str(cause).strip().splitlines()[0]
    return message


def _quiet_rank() -> bool:
    """True on a rank other than 0 under torchrun/Slurm: errors every rank shares are rank 0's to print."""
    return env_rank() not in (None, 0)


@contextlib.contextmanager
def exit_on_user_error(quiet: bool = False):
    """Turn a user error into ``error: <one line>`` and exit code 2; let bugs raise.

    In a worker of our own launcher the line goes to the parent, which prints it once. Under
    torchrun or Slurm, rank 0 prints the errors that every rank raises alike (config checks
    before the process group forms, and exceptions marked ``collective``); a rank's own error
    is printed by that rank. A run stopped by SIGINT/SIGTERM exits 128 + the signal's number.
    """
    def report(message: str, collective: bool) -> None:
        _LAST_ERROR["line"] = message
        if not record_worker_error(message) and not ((quiet or collective) and _quiet_rank()):
            print(message if message.startswith("sparsecomm:") else f"error: {message}", file=sys.stderr, flush=True)

    try:
        yield
    except WorkerFailed as e:
        print(f"error: a worker failed:\n{e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except Interrupted as e:
        report(f"sparsecomm: {e}", True)
        raise SystemExit(e.exit_code) from None
    except PeerLost as e:
        if not record_worker_error(f"{PEER_LOST_RECORD}{e}"):  # the launcher adds its resume command
            hint = f"; {resume_hint(e.run_dir, _OVERRIDES, e.checkpoint)}" if e.run_dir else ""
            print(f"sparsecomm: {e}{hint}", file=sys.stderr, flush=True)
        raise SystemExit(PEER_LOST_EXIT) from None
    except rundir.AlreadyFinished as e:
        report(str(e), True)
        raise SystemExit(0) from None
    except _user_error_types() as e:
        if os.environ.get("SPARSECOMM_TRACEBACK"):
            raise
        report(one_line(e), quiet or bool(getattr(e, "collective", False)))
        raise SystemExit(USER_ERROR_EXIT) from None


# --- the app ----------------------------------------------------------------------------------

def _worker(container: dict, run_dir: str, t0: float) -> dict[str, Any]:
    """Entry point of each worker the bare app starts (torch elastic sets RANK etc.)."""
    runlock.die_with_parent()  # the launching process holds the run folder's lock: its workers end with it
    with exit_on_user_error():
        return trainer.run(OmegaConf.create(container), run_dir, t0)


def run(cfg: DictConfig) -> dict[str, Any] | None:
    """Check the config, then join the world (torchrun / Slurm / one process) or start it."""
    check_config(cfg)  # again: a sweep job's own combination of values, or an app() called directly
    run_dir = HydraConfig.get().runtime.output_dir
    plan = launch.plan(cfg.cluster)
    if plan.mode in ("join", "single"):
        return trainer.run(cfg, run_dir, _T0)
    container = OmegaConf.to_container(cfg, resolve=True)  # resolved here, where ${hydra:...} works
    try:
        results = launch.launch_workers(cfg.cluster, plan, _worker, container, run_dir, _T0,
                                        run_id=os.path.basename(run_dir))
    except PeerLost as e:
        e.run_dir, e.checkpoint = run_dir, cfg.checkpoint
        raise
    return results.get(0)


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name=CONFIG_NAME)
def app(cfg: DictConfig) -> dict[str, Any] | None:
    if sweep.in_sweep():
        return sweep_job(cfg)
    with exit_on_user_error():
        return run(cfg)


def sweep_job(cfg: DictConfig) -> dict[str, Any] | None:
    """One job of a sweep: recorded, and a failure does not stop the sweep (:func:`sparsecomm.app.sweep.run_job`)."""
    def attempt() -> dict[str, Any] | None:
        _LAST_ERROR.clear()
        with exit_on_user_error():
            return run(cfg)
    return sweep.run_job(attempt, lambda: _LAST_ERROR.get("line"), owner=env_rank() in (None, 0),
                         stop_on_failure=bool(cfg.get("stop_sweep_on_failure")))


# --- before Hydra runs: the config checked (sparsecomm.app.compose), the run directory claimed -----

def claim_run_dir(cfg: DictConfig, overrides: list[str], *, multirun: bool, create: bool) -> rundir.Claim | None:
    """Decide this run's folder before Hydra writes into it (``sparsecomm.app.rundir``); None: Hydra's choice.

    With ``create`` (the process that owns the run) the folder's lock is taken and held in the
    returned claim (:mod:`sparsecomm.app.runlock`); a folder a live run holds is refused as such.
    """
    explicit_dir = None
    for o in _parse_overrides(overrides):
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


def main(argv: list[str] | None = None) -> Any:
    """Console entry point: checks the overrides, claims the run directory, then runs the Hydra app.

    ``--check``: compose and check the config and the run directory, print ``ok``, and start
    nothing (the cluster scripts run it before torchrun, so a bad value is reported once and
    never retried by torchrun's restarts). Exit code 0, or 2 with one ``error:`` line.
    ``--version``: print ``sparsecomm <version>`` and start nothing.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--version" in argv:
        print(f"sparsecomm {sparsecomm.__version__}", flush=True)
        return None
    check_only = "--check" in argv
    argv = [a for a in argv if a != "--check"]
    args, _ = get_args_parser().parse_known_args(argv)
    informational = args.help or args.hydra_help or args.cfg or args.info or args.shell_completion
    extra: list[str] = []
    claim = cfg = None
    owner = env_rank() in (None, 0)  # the process that owns the run directory (others follow rank 0's)
    _LAST_ERROR.clear()
    if not informational:
        with exit_on_user_error(quiet=not owner):
            if not (args.config_dir or args.config_path or args.experimental_rerun):
                cfg = preflight(args.config_name or CONFIG_NAME, args.overrides)
                claim = claim_run_dir(cfg, args.overrides, multirun=bool(args.multirun),
                                      create=owner and not check_only)
        if check_only:
            print(f"ok: config checked{f'; run directory {claim.path}' if claim else ''}", flush=True)
            return None
        if not owner:
            # Under torchrun/Slurm every rank runs Hydra: only rank 0 writes into the run directory.
            extra = ["hydra.run.dir=.", "hydra.output_subdir=null"]
        elif claim is not None and args.multirun and not any(o.split("=", 1)[0] == "hydra.sweep.dir"
                                                             for o in args.overrides):
            # the claimed folder, as a value: Slurm jobs of the submitit launcher resolve it elsewhere
            extra = [f"hydra.sweep.dir={hints.hydra_value(claim.path)}"]
    # Our hydra/launcher/submitit_slurm.yaml shares the plugin's schema name on purpose: Hydra then
    # validates it against that schema, and says so in a deprecation warning we do not need to see.
    warnings.filterwarnings("ignore", message=".*is validated against ConfigStore schema", category=UserWarning)
    sys.argv = [sys.argv[0], *argv, *extra]
    if claim is not None and owner:
        _CLAIMED["sweep" if args.multirun else "run"] = claim.path
    options = [a for a in argv if a not in set(args.overrides)]
    _OVERRIDES[:] = args.overrides
    try:
        result = app()
    except SystemExit as e:
        if claim is not None and owner:
            _after_failure(claim, args, options, cfg, e.code)
        raise
    except BaseException:
        if claim is not None and owner:
            _after_failure(claim, args, options, cfg, 1)
        raise
    finally:
        _CLAIMED.clear()
        _OVERRIDES.clear()
        if claim is not None:
            claim.release()
    if claim is not None and owner and args.multirun:
        code = sweep.report(claim.path, args.overrides)
        if code:
            raise SystemExit(code)
    return result


def _after_failure(claim: rundir.Claim, args, options: list[str], cfg: DictConfig | None, code) -> None:
    """A sweep says what happened to each job; a failed start leaves no empty folder; a run that
    crashed, was interrupted or could not write a file says how to resume."""
    if args.multirun:
        sweep.report(claim.path, args.overrides)
        return
    if claim.created and rundir.discard_if_empty(claim.path):
        return
    if code == PEER_LOST_EXIT:  # PeerLost's line holds the resume command already
        return
    resumable = code != USER_ERROR_EXIT or writes.is_write_failure(_LAST_ERROR.get("line", ""))
    if resumable and os.path.isdir(claim.path):
        print(f"sparsecomm: run directory {claim.path}; "
              f"{resume_hint(claim.path, args.overrides, cfg.get('checkpoint') if cfg is not None else None, options)}",
              file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
