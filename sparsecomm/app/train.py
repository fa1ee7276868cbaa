"""``sparsecomm-train`` (also ``python -m sparsecomm.app.train``): the Hydra app.

    sparsecomm-train                                   # 2 Gloo workers, FISH mask, digits
    sparsecomm-train mask.density=0.02 steps=200       # any config value
    sparsecomm-train mask=random schedule=refresh      # any config group option
    torchrun --nproc_per_node 4 -m sparsecomm.app.train cluster=single_node_gpu

Run bare, the app starts its own workers (``cluster``: nnodes x nproc_per_node, torch's
elastic launch API) and hands them the composed config and the run directory. Started by
torchrun or Slurm, it takes its rank from the environment and starts nothing
(:mod:`sparsecomm.app.launch`).

The command line is read once: the config is composed and checked once
(:mod:`sparsecomm.app.compose`), the run folder claimed (:mod:`sparsecomm.app.runfolder`) and set
as Hydra's ``hydra.run.dir`` (``hydra.sweep.dir``), and Hydra runs the app with that very config
(:mod:`sparsecomm.app.hydra_run`). A bad override, value or input ends in ONE line ``error: ...``
on stderr and exit code 2, never a traceback (:mod:`sparsecomm.app.errors`;
``SPARSECOMM_TRACEBACK=1`` shows it). Configs live in ``conf/``, installed as the package
``sparsecomm.conf`` (each option a YAML over its schema, :mod:`sparsecomm.app.schema`), so the app
works from a checkout and from a plain ``pip install``.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
import warnings
from typing import Any

from hydra._internal.utils import _run_hydra, get_args_parser
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import sparsecomm

from . import hydra_run, launch, runfolder, runlock, sweep, trainer, writes
from .compose import CONFIG_MODULE, CONFIG_NAME, compose_app, compose_config, config_groups, create_hydra, job_config  # noqa: F401
from .config import check_config
from .errors import (  # noqa: F401  (exit_on_user_error, one_line: the entry points' and tests')
    PEER_LOST_EXIT, USER_ERROR_EXIT, ErrorReport, exit_on_user_error, one_line, user_error_types)
from .launch import env_rank
from .peers import PeerLost

_T0 = time.time()


def _worker(container: dict, run_dir: str, t0: float, launcher: int) -> dict[str, Any]:
    """Entry point of each worker the bare app starts (torch elastic sets RANK etc.)."""
    runlock.die_with(launcher)  # the launching process holds the run folder's lock: its workers end with it
    with exit_on_user_error():
        return trainer.run(OmegaConf.create(container), run_dir, t0)


def _task_modules(cfg: DictConfig) -> list[str]:
    """The task's module, for the workers' forkserver to import (the app's own tasks only: a user's
    module may do anything on import)."""
    module = str(cfg.task.get("_target_", "")).rpartition(".")[0]
    return [module] if module.startswith("sparsecomm.") else []


def run(cfg: DictConfig) -> dict[str, Any] | None:
    """Join the world (torchrun / Slurm / one process) or start it, and train."""
    run_dir = HydraConfig.get().runtime.output_dir
    plan = launch.plan(cfg.cluster)
    if plan.mode in ("join", "single"):
        return trainer.run(cfg, run_dir, _T0)
    container = OmegaConf.to_container(cfg, resolve=True)  # resolved here, where ${hydra:...} works
    try:
        results = launch.launch_workers(cfg.cluster, plan, _worker, container, run_dir, _T0, os.getpid(),
                                        run_id=os.path.basename(run_dir), preload=_task_modules(cfg))
    except PeerLost as e:
        e.run_dir, e.checkpoint = run_dir, cfg.checkpoint
        raise
    return results.get(0)


class App:
    """The task function Hydra runs, once or per sweep job; its user errors reported by :attr:`errors`."""

    def __init__(self, overrides: list[str]) -> None:
        self.errors = ErrorReport(overrides)

    def __call__(self, cfg: DictConfig) -> dict[str, Any] | None:
        if sweep.in_sweep():
            return self.sweep_job(cfg)
        with self.errors.guard():
            return run(cfg)

    def sweep_job(self, cfg: DictConfig) -> dict[str, Any] | None:
        """One job of a sweep: its own combination of values checked, the job recorded, and a failure
        does not stop the sweep (:func:`sparsecomm.app.sweep.run_job`)."""
        def attempt() -> dict[str, Any] | None:
            self.errors.last_line = None
            with self.errors.guard():
                check_config(cfg)
                return run(cfg)
        return sweep.run_job(attempt, lambda: self.errors.last_line, owner=env_rank() in (None, 0),
                             stop_on_failure=bool(cfg.get("stop_sweep_on_failure")))


def main(argv: list[str] | None = None) -> None:
    """Console entry point: composes and checks the config, claims the run directory, runs the app.

    ``--check``: compose and check the config and the run directory, print ``ok``, and start
    nothing (the cluster scripts run it before torchrun, so a bad value is reported once and
    never retried by torchrun's restarts). Exit code 0, or 2 with one ``error:`` line.
    ``--version``: print ``sparsecomm <version>`` and start nothing. ``--help``, ``--cfg``,
    ``--info``, ...: Hydra's, as Hydra prints them.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--version" in argv:
        print(f"sparsecomm {sparsecomm.__version__}", flush=True)
        return None
    check_only = "--check" in argv
    parser = get_args_parser()
    args, _ = parser.parse_known_args([a for a in argv if a != "--check"])
    app = App(args.overrides)
    # Our hydra/launcher/submitit_slurm.yaml shares the plugin's schema name on purpose: Hydra then
    # validates it against that schema, and says so in a deprecation warning we do not need to see.
    warnings.filterwarnings("ignore", message=".*is validated against ConfigStore schema", category=UserWarning)
    if args.help or args.hydra_help or args.cfg or args.info or args.shell_completion or args.experimental_rerun:
        _run_hydra(args=args, args_parser=parser, task_function=app, config_path=f"pkg://{CONFIG_MODULE}",
                   config_name=CONFIG_NAME)
        return None
    owner = env_rank() in (None, 0)  # the process that owns the run directory (others follow rank 0's)
    multirun = bool(args.multirun)
    try:
        with app.errors.guard(quiet=not owner):
            hydra = create_hydra(args.config_dir, args.config_path)
            cfg = compose_app(hydra, args.config_name or CONFIG_NAME, args.overrides, multirun=multirun,
                              known_keys=not (args.config_dir or args.config_path))
            job = job_config(cfg)
            claim = runfolder.claim_run_dir(job, args.overrides, multirun=multirun, create=owner and not check_only)
        if check_only:
            print(f"ok: config checked{f'; run directory {claim.path}' if claim else ''}", flush=True)
            return None
        _run(hydra, cfg, app, claim, owner, multirun, options=[a for a in argv if a not in args.overrides],
             checkpoint_cfg=job.checkpoint)
        return None  # the console script's exit code 0 (the summary is in the run folder)
    except SystemExit as e:
        app.errors.leave_the_line_to_rank_zero(e.code)
        raise
    finally:
        GlobalHydra.instance().clear()


def _run(hydra, cfg: DictConfig, app: App, claim, owner: bool, multirun: bool, options: list[str],
         checkpoint_cfg) -> None:
    """Hydra runs ``app`` in the claimed folder; a failure says how to go on; a sweep reports its jobs."""
    overrides = app.errors.overrides
    folder_key = "sweep.dir" if multirun else "run.dir"
    if not owner:  # under torchrun/Slurm every rank runs the app: only rank 0 writes into the run directory
        hydra_run.set_hydra_value(cfg, "run.dir", ".")
        hydra_run.set_hydra_value(cfg, "output_subdir", None)
    elif claim is not None and not any(o.split("=", 1)[0] == f"hydra.{folder_key}" for o in overrides):
        hydra_run.set_hydra_value(cfg, folder_key, claim.path)
    try:
        with app.errors.guard(quiet=not owner):
            try:
                (hydra_run.multirun if multirun else hydra_run.run)(hydra, cfg, app)
            except user_error_types():
                raise
            except Exception:  # a bug: its traceback, and exit code 1
                traceback.print_exc()
                raise SystemExit(1) from None
    except BaseException as e:
        if claim is not None and owner:
            code = e.code if isinstance(e, SystemExit) else 1
            resumable = code != PEER_LOST_EXIT and (code != USER_ERROR_EXIT
                                                    or writes.is_write_failure(app.errors.last_line or ""))
            runfolder.report_failure(claim, multirun, overrides, options, checkpoint_cfg, resumable)
        raise
    finally:
        if claim is not None:
            claim.release()
    if claim is not None and owner and multirun:
        code = sweep.report(claim.path, overrides)
        if code:
            raise SystemExit(code)


if __name__ == "__main__":
    main()
