"""``sparsecomm-train`` (also ``python -m sparsecomm.train``): the Hydra app.

    sparsecomm-train                                   # 2 Gloo workers, FISH mask, digits
    sparsecomm-train mask.density=0.02 steps=200       # any config value
    sparsecomm-train mask=random schedule=refresh      # any config group option
    torchrun --nproc_per_node 4 -m sparsecomm.train cluster=single_node_gpu

Run bare, the app starts its own workers (``cluster``: nnodes x nproc_per_node, torch's
elastic launch API) and hands them the composed config and the run directory. Started by
torchrun or Slurm, it takes its rank from the environment and starts nothing
(:mod:`sparsecomm.launch`).

A bad override, value or input ends in ONE line ``error: ...`` on stderr and exit code 2, never
a traceback (``SPARSECOMM_TRACEBACK=1`` shows it). Configs live in ``conf/``, installed as the
package ``sparsecomm.conf``, so the app works from a checkout and from a plain ``pip install``.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from datetime import datetime
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

CONFIG_MODULE = "sparsecomm.conf"
CONFIG_NAME = "train"
USER_ERROR_EXIT = 2
_T0 = time.time()


def run_id(explicit: str | None = None) -> str:
    """A name for the run directory that every rank of one run computes the same.

    ``run_id=...`` if given, else the launcher's run id (``TORCHELASTIC_RUN_ID``, which torchrun
    sets from ``--rdzv_id``; ``SLURM_JOB_ID``), else a timestamp (one process decides: the bare
    launcher, which hands the directory to its workers).
    """
    if explicit:
        return str(explicit)
    rid = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if rid and rid != "none":
        return rid
    if os.environ.get("SLURM_JOB_ID"):
        step = os.environ.get("SLURM_ARRAY_TASK_ID")
        return os.environ["SLURM_JOB_ID"] + (f"_{step}" if step else "")
    return datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


if not OmegaConf.has_resolver("sc_run_id"):
    OmegaConf.register_new_resolver("sc_run_id", lambda explicit=None: run_id(explicit), use_cache=True)


# --- errors a user can fix: one line, exit 2 ------------------------------------------------------

def _user_error_types() -> tuple[type[BaseException], ...]:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from .distributed import RankDisagreement
    from .launch import WorkerUserError

    return (ValueError, FileNotFoundError, NotADirectoryError, ImportError, RankDisagreement,
            WorkerUserError, HydraException, OmegaConfBaseException)


def one_line(exc: BaseException) -> str:
    """The user-facing message of ``exc`` on one line (Hydra's multi-line errors condensed)."""
    from hydra.errors import MissingConfigException

    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file:
        group, _, option = str(exc.missing_cfg_file).rpartition("/")
        options = ", ".join(exc.options or [])
        if group:
            return (f"{group}={option}: no such option in config group '{group}'"
                    + (f"; choose one of: {options}" if options else ""))
        return f"config '{option}' not found" + (f"; choose one of: {options}" if options else "")
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


@contextlib.contextmanager
def exit_on_user_error():
    """Turn a user error into ``error: <one line>`` and exit code 2; let bugs raise.

    In a worker of our own launcher the line goes to the parent, which prints it once; anywhere
    else (one process, a rank under torchrun or Slurm) it is printed here.
    """
    from .launch import WorkerFailed, record_worker_error

    try:
        yield
    except WorkerFailed as e:
        print(f"error: a worker failed:\n{e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except _user_error_types() as e:
        if os.environ.get("SPARSECOMM_TRACEBACK"):
            raise
        message = one_line(e)
        if not record_worker_error(message):
            print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR_EXIT) from None


# --- the app ----------------------------------------------------------------------------------

def _worker(container: dict, run_dir: str, t0: float) -> dict[str, Any]:
    """Entry point of each worker the bare app starts (torch elastic sets RANK etc.)."""
    from . import trainer

    with exit_on_user_error():
        return trainer.run(OmegaConf.create(container), run_dir, t0)


def run(cfg: DictConfig) -> dict[str, Any] | None:
    """Check the config, then join the world (torchrun / Slurm / one process) or start it."""
    from hydra.core.hydra_config import HydraConfig

    from . import launch, trainer
    from .config import check_config

    check_config(cfg)
    run_dir = HydraConfig.get().runtime.output_dir
    plan = launch.plan(cfg.cluster)
    if plan.mode in ("join", "single"):
        return trainer.run(cfg, run_dir, _T0)
    container = OmegaConf.to_container(cfg, resolve=True)  # resolved here, where ${hydra:...} works
    results = launch.launch_workers(cfg.cluster, plan, _worker, container, run_dir, _T0,
                                    run_id=os.path.basename(run_dir))
    return results.get(0)


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name=CONFIG_NAME)
def app(cfg: DictConfig) -> dict[str, Any] | None:
    with exit_on_user_error():
        return run(cfg)


def preflight(config_name: str, overrides: list[str]) -> None:
    """Compose and check the config before Hydra runs, so bad overrides fail in one line."""
    from hydra import compose, initialize_config_module

    from .config import check_config

    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides)
    check_config(cfg)


def main(argv: list[str] | None = None) -> Any:
    """Console entry point: checks the overrides, then runs the Hydra app on them."""
    from hydra._internal.utils import get_args_parser

    from .launch import env_rank

    argv = list(sys.argv[1:] if argv is None else argv)
    args, _ = get_args_parser().parse_known_args(argv)
    informational = args.help or args.hydra_help or args.cfg or args.info or args.shell_completion
    extra: list[str] = []
    if not informational:
        if not (args.multirun or args.config_dir or args.config_path or args.experimental_rerun):
            with exit_on_user_error():
                preflight(args.config_name or CONFIG_NAME, args.overrides)
        rank = env_rank()
        if rank not in (None, 0):
            # Under torchrun/Slurm every rank runs Hydra: only rank 0 owns the run directory.
            extra = ["hydra.run.dir=.", "hydra.output_subdir=null"]
    # Our hydra/launcher/submitit_slurm.yaml shares the plugin's schema name on purpose: Hydra then
    # validates it against that schema, and says so in a deprecation warning we do not need to see.
    warnings.filterwarnings("ignore", message=".*is validated against ConfigStore schema", category=UserWarning)
    sys.argv = [sys.argv[0], *argv, *extra]
    return app()


if __name__ == "__main__":
    main()
