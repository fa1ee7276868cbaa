"""The app's configuration checked in one place, and its one hash.

Types and defaults are the schema's (:mod:`sparsecomm.app.schema`): OmegaConf refuses a value of
the wrong type while Hydra composes, and :func:`composition_error` turns its message into ours.
:func:`check_config` then asks every option of the composed config to check its own fields
(:class:`~sparsecomm.app.fields.Option`: ranges, the fields of more than one type, its own rules,
the files it reads) and checks what belongs to no single option (the step plan over the run, which
asks the mask option whether it trains sparse steps). It never branches on an option's name. Every
error is a :class:`ConfigError` (or a library ValueError) whose message names the field and the fix;
the app prints it as one line.

:func:`config_hash` is the config's one hash: what the ranks compare to prove they run the same
training config, and what a checkpoint records (a resumed run must match it).
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Iterator
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, nodes
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from .cluster_checks import check_cluster, visible_gpus  # noqa: F401  (the launcher's, re-checked on each node)
from .fields import KINDS, ClusterError, ConfigError, Option, show  # noqa: F401
from .schedule import LRSchedule, Schedule
from .schema import WandbConfig

# Config fields a resumed run may change: where and how it runs, what it logs. Everything else
# (task, mask, schedule, optim, steps, batch_size, seed, comm) must match the checkpoint's.
RESUME_FREE = ("cluster", "checkpoint", "logging", "out_dir", "run_id", "num_workers", "eval_every",
               "eval_batch_size", "save_model", "nonfinite", "stop_sweep_on_failure")


# --- Hydra's type errors, in our words -------------------------------------------------------------

def _node_kind(node) -> str:
    """What a field of the schema takes, in words: "a whole number", "a mapping of project, ... or null"."""
    for cls, kind in ((nodes.BooleanNode, bool), (nodes.IntegerNode, int), (nodes.FloatNode, float),
                      (nodes.StringNode, str), (ListConfig, list), (DictConfig, dict)):
        if isinstance(node, cls):
            text = KINDS[kind]
            ref = node._metadata.ref_type if kind is dict else None
            if dataclasses.is_dataclass(ref):
                text += " of " + ", ".join(f.name for f in dataclasses.fields(ref))
            return text + (" or null" if node._is_optional() else "")
    return "another value"


def composition_error(exc: BaseException | None, base: DictConfig, overrides: list[str],
                      key: str | None = None) -> ConfigError | None:
    """The one-line :class:`ConfigError` for a value the schema refused while Hydra composed.

    ``base``: the config of the same group options, no value overridden (its field says the type
    and gives the example); ``overrides``: the command line, to show the value as typed; ``key``:
    the field, when ``exc`` does not name it. None when the field is not known.
    """
    cause = exc
    while cause is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__ or cause.__context__
    key = key or re.sub(r"\[\d+\]$", "", str(getattr(cause, "full_key", "") or ""))
    if not key:
        return None
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(base, parent, default=None) if parent else base
    field = node._get_node(leaf) if isinstance(node, DictConfig) and leaf in node else None
    if field is None:
        return None
    mine = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] == key]
    example = ""
    if not (field._is_missing() or field._is_none() or OmegaConf.is_interpolation(node, leaf)
            or isinstance(field, DictConfig)):
        default = OmegaConf.to_container(field) if isinstance(field, ListConfig) else field._value()
        default = str(default).lower() if isinstance(default, bool) else default
        example = f"; e.g. {key}={str(default).replace(' ', '')}"
    if any(o.startswith("~") for o in mine):
        return ConfigError(f"~{key}: a field of the config cannot be deleted; set a value instead{example}")
    typed = next((o.split("=", 1)[1] for o in mine if "=" in o), None)
    shown = typed if typed is not None else show(getattr(cause, "value", None) if cause is not None else None)
    return ConfigError(f"{key}={shown} must be {_node_kind(field)}{example}")


# --- every option checks its own fields; the rules between groups ---------------------------------

def options(cfg: DictConfig, path: str = "") -> Iterator[tuple[str, DictConfig]]:
    """Every node of ``cfg`` typed by a schema dataclass (an :class:`Option`), with its path (``mask.``)."""
    if isinstance(OmegaConf.get_type(cfg), type) and issubclass(OmegaConf.get_type(cfg), Option):
        yield path, cfg
    for key in cfg.keys():
        child = cfg._get_node(key)
        if key != "hydra" and isinstance(child, DictConfig) and not child._is_none():
            yield from options(cfg[key], f"{path}{key}.")


def check_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` (or the library's ValueError) naming the first bad field."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        raise ConfigError(f"{e.full_key} is required but not set; add {e.full_key}=... to the command line") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{getattr(e, 'full_key', '') or 'config'}: {str(e).splitlines()[0]}") from None
    found = [(path, OmegaConf.to_object(node)) for path, node in options(cfg)]
    for path, option in found:
        option.check_fields(path)
    for _, option in found:
        option.check(cfg)
    check_schedule(cfg)


def check_schedule(cfg: DictConfig) -> None:
    """The step plan (``schedule``, ``schedule/lr``) over ``steps``: a mask that trains sparse steps
    (under a comm option that sends what it selects) needs the dense warm-up to leave some."""
    sparse = getattr(OmegaConf.get_type(cfg.mask), "sparse", True) and \
        getattr(OmegaConf.get_type(cfg.comm), "uses_mask", True)  # comm=fp16, ...: the mask is unused
    schedule = Schedule.from_config(cfg.schedule, cfg.steps, cfg.seed, masked=sparse)
    LRSchedule.from_config(cfg.schedule.lr, schedule.steps)


def check_wandb(logging: Any) -> None:
    """``logging.wandb`` off, or a known mode and the wandb package installed (:class:`WandbConfig`)."""
    wb = logging.get("wandb") if logging is not None else None
    if wb:
        OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(WandbConfig), wb)).check(None)


# --- the one hash ---------------------------------------------------------------------------------

def training_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config without :data:`RESUME_FREE`: what a resumed run must share."""
    container = OmegaConf.to_container(cfg, resolve=True)
    return {k: v for k, v in container.items() if k not in RESUME_FREE and k != "hydra"}


def config_hash(cfg: DictConfig) -> str:
    """SHA-256 of the training config (:func:`training_config`, keys sorted): the ranks compare it
    before training, a checkpoint records it, a resumed run must match it."""
    return hashlib.sha256(OmegaConf.to_yaml(OmegaConf.create(training_config(cfg)), sort_keys=True).encode()).hexdigest()
