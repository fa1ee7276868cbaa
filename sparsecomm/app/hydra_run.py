"""Hydra runs the app with the config the app composed and checked (:func:`sparsecomm.app.compose.compose_app`).

Hydra's own ``Hydra.run`` / ``Hydra.multirun`` compose the config themselves; these two do what
they do after that, with the config handed in: Hydra's callbacks, the job's folder and its
``.hydra/`` record (:func:`hydra.core.utils.run_job`), and for a sweep the sweeper and the
launcher of ``hydra/launcher`` (basic: the jobs one after the other in this process; submitit:
Slurm jobs), which compose each job's config from the sweep's Hydra overrides plus the job's own.
:func:`set_hydra_value` sets a value of Hydra's node both in the config and among those overrides,
so the sweep's jobs get it too (the claimed sweep folder, ``hydra.output_subdir=null``).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hydra._internal.callbacks import Callbacks
from hydra._internal.hydra import Hydra
from hydra.core.plugins import Plugins
from hydra.core.utils import configure_log, run_job
from hydra.types import HydraContext
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from .hints import hydra_value


def set_hydra_value(cfg: DictConfig, key: str, value: str | None) -> None:
    """``hydra.<key>=value`` in ``cfg`` and in its Hydra overrides (``value`` None: null)."""
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        OmegaConf.update(cfg.hydra, key, value, merge=False)
        cfg.hydra.overrides.hydra.append(f"hydra.{key}={'null' if value is None else hydra_value(value)}")


def run(hydra: Hydra, cfg: DictConfig, task: Callable[[DictConfig], Any]) -> Any:
    """One run in ``hydra.run.dir``: ``task``'s return value (its exception raised again)."""
    configure_log(cfg.hydra.hydra_logging, cfg.hydra.verbose)
    callbacks = Callbacks(cfg)
    callbacks.on_run_start(config=cfg, config_name=cfg.hydra.job.config_name)
    ret = run_job(hydra_context=HydraContext(config_loader=hydra.config_loader, callbacks=callbacks),
                  task_function=task, config=cfg, job_dir_key="hydra.run.dir", job_subdir_key=None)
    callbacks.on_run_end(config=cfg, config_name=cfg.hydra.job.config_name, job_return=ret)
    return ret.return_value


def multirun(hydra: Hydra, cfg: DictConfig, task: Callable[[DictConfig], Any]) -> Any:
    """The sweep of ``cfg``'s sweep overrides, one job per point, through the configured launcher."""
    configure_log(cfg.hydra.hydra_logging, cfg.hydra.verbose)
    callbacks = Callbacks(cfg)
    callbacks.on_multirun_start(config=cfg, config_name=cfg.hydra.job.config_name)
    sweeper = Plugins.instance().instantiate_sweeper(
        config=cfg, hydra_context=HydraContext(config_loader=hydra.config_loader, callbacks=callbacks),
        task_function=task)
    ret = sweeper.sweep(arguments=OmegaConf.to_container(cfg.hydra.overrides.task, resolve=False))
    callbacks.on_multirun_end(config=cfg, config_name=cfg.hydra.job.config_name)
    return ret
