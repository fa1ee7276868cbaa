"""The app's config checks: every field of the composed config checked before any rank starts.

``check_config(cfg)`` raises :class:`ConfigError` (or a module's own ValueError) whose message
names the first bad field and the fix; the app prints it as one line. ``config_hash(cfg)`` is
what the ranks compare to prove they run the same config.
"""
from __future__ import annotations

import hashlib
import os

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from . import fault, launch
from .fields import whole_number
from .metrics import check_wandb
from .mask_config import build_schedule, check_mask_config
from .schedule import LRSchedule

MASK_KINDS = ("fisher", "random", "dense", "file", "diff_pruning", "width_core")
OPTIMIZERS = ("adamw", "sgd")


class ConfigError(ValueError):
    """A config value the app cannot run with; the message names the field and the fix.

    ``collective``: a function of the config, which every rank holds alike, so every rank raises it
    and rank 0's line is enough.
    """

    collective = True


# --- every field: its type (its default's), and the range of the numbers ----------------------
# The type of a field is the type of its default in the YAML of the chosen option; these fields
# default to null or take more than one type, so their types are written here (None: null).
FIELD_TYPES: dict[str, tuple] = {
    "cluster.nproc_per_node": (int, str), "cluster.nnodes": (int,), "cluster.socket_ifname": (str, None),
    "cluster.master_port": (int, None), "task.train_size": (int, None),
    "run_id": (str, int, None), "checkpoint.dir": (str, None), "comm.wire_dtype": (str, None),
    "cluster.num_threads": (int, None), "cluster.rdzv_id": (str, int, None), "cluster.rdzv_endpoint": (str, None),
    "cluster.link.inter_node_gbit": (int, float, None), "cluster.link.intra_node_gbit": (int, float, None),
    "mask.always": (str, list, None), "mask.alone_lr": (int, float, None), "schedule.core_full": (str, int, float, None),
    "task.model_dir": (str, None), "task.data_dir": (str, None),
    "logging.wandb": (dict, None), "logging.wandb.entity": (str, None), "logging.wandb.name": (str, None),
    **{f"task.{k}": (int, None) for k in ("in_features", "hidden", "depth", "vocab_size", "n_layer", "n_head",
                                          "n_embd", "block_size")},
}
# Fields that may be null although their default is not.
NULL_ALLOWED = {"schedule.core_full"}
# Numeric ranges not checked where the field is read: (low, high, low exclusive).
BOUNDS: dict[str, tuple] = {
    "comm.bucket_cap_mb": (0, 1e6, True), "cluster.max_restarts": (0, 1000, False),
    "cluster.nproc_per_node": (1, 4096, False), "cluster.nnodes": (1, 100_000, False),
    "cluster.num_threads": (1, 4096, False), "cluster.master_port": (1, 65535, False),
    "cluster.link.inter_node_gbit": (0, None, True), "cluster.link.intra_node_gbit": (0, None, True),
    "num_workers": (0, 256, False), "seed": (0, 2**63 - 1, False), "mask.seed": (0, 2**63 - 1, False),
    "task.seed": (0, 2**32 - 1, False), "task.test_fraction": (0, 1, True), "task.num_classes": (2, 100_000, False),
    "logging.log_every": (1, None, False), "optim.eps": (0, None, False), "optim.weight_decay": (0, None, False),
    "optim.momentum": (0, 1, False),
    # diff pruning's gates: sigmoid saturates long before these bounds; beyond them float32 overflows
    "mask.log_alpha_init": (-100, 100, False), "mask.temperature": (0, 100, True), "mask.alpha_lr": (0, 1e3, True),
    "mask.l0_penalty": (0, 1e3, False),
    # sizes that allocate: bounded so that a typo's 10**12 is an error, not an out-of-memory crash
    "task.num_train": (1, 10**8, False), "task.num_test": (1, 10**8, False), "task.in_features": (1, 10**6, False),
    "task.hidden": (1, 10**6, False), "task.depth": (1, 10**4, False), "task.vocab_size": (1, 10**7, False),
    "task.n_layer": (1, 10**4, False), "task.n_head": (1, 10**4, False), "task.n_embd": (1, 10**6, False),
    "task.block_size": (1, 10**6, False), "steps": (1, 10**12, False), "task.train_size": (1, 10**8, False),
    "task.test_size": (1, 10**8, False), "task.max_length": (1, 10**5, False),
}
_KINDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string", list: "a list",
          dict: "a mapping"}


def _kind(value):
    from omegaconf import DictConfig, ListConfig

    if isinstance(value, ListConfig):
        return list
    if isinstance(value, DictConfig):
        return dict
    return type(value)


def _fits(value, types: tuple) -> bool:
    kind = _kind(value)
    if value is None:
        return None in types
    if kind is bool:
        return bool in types
    if kind is int:
        return int in types or float in types
    return kind in types


def check_field_types(cfg: DictConfig, defaults: DictConfig, prefix: str = "") -> None:
    """Every leaf of ``cfg`` has its default's type (``defaults``: the config of the same group
    options, no field overridden), and every number in :data:`BOUNDS` lies in its range."""
    import math

    from omegaconf import DictConfig

    for key in cfg.keys():
        if key == "hydra":
            continue
        path = f"{prefix}{key}"
        value = OmegaConf.select(cfg, str(key), throw_on_resolution_failure=False)
        default = OmegaConf.select(defaults, str(key), default=None, throw_on_resolution_failure=False) \
            if isinstance(defaults, DictConfig) else None
        if path in FIELD_TYPES:
            types = FIELD_TYPES[path]
        elif default is not None:
            kind = _kind(default)
            types = (int, float) if kind is float else (kind,)
            if path in NULL_ALLOWED:
                types = (*types, None)
        else:
            types = None
        if isinstance(value, DictConfig) and (types is None or dict in types):
            check_field_types(value, default if isinstance(default, DictConfig) else None, f"{path}.")
            continue
        if types is not None and not _fits(value, types):
            names = [_KINDS[t] if t is not None else "null" for t in types if not (t is int and float in types)]
            want = " or ".join(names)
            shown = str(default).lower() if isinstance(default, bool) else default
            example = f"; e.g. {path}={shown}" if default is not None and not isinstance(default, DictConfig) else ""
            raise ConfigError(f"{path}={_show(value)} must be {want}{example}")
        if path in BOUNDS and isinstance(value, (int, float)) and not isinstance(value, bool):
            low, high, exclusive = BOUNDS[path]
            bad = (not math.isfinite(value) or (value <= low if exclusive else value < low)
                   or (high is not None and value > high))
            if bad:
                span = f"{'>' if exclusive else '>='} {low}" + (f" and <= {high:g}" if high is not None else "")
                raise ConfigError(f"{path}={_show(value)} is out of range: it must be {span}")


def _show(value) -> str:
    text = repr(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` (or the library's ValueError) naming the first bad field."""
    from sparsecomm.hook import resolve_wire_dtype
    from sparsecomm.mask import check_density

    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        raise ConfigError(f"{e.full_key} is required but not set; add {e.full_key}=... to the command line") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{getattr(e, 'full_key', '') or 'config'}: {str(e).splitlines()[0]}") from None
    for key, minimum in (("steps", 1), ("batch_size", 1), ("eval_batch_size", 1), ("eval_every", 0),
                         ("num_workers", 0)):
        whole_number(cfg.get(key), key, minimum, ConfigError)
    launch.check_cluster(cfg.cluster)
    if not cfg.get("task") or "_target_" not in cfg.task:
        raise ConfigError("task has no _target_; pick a task config, e.g. task=digits")

    mask = cfg.mask
    if mask.get("name") not in MASK_KINDS:
        raise ConfigError(f"mask.name={mask.get('name')!r} is unknown; use mask=fisher, mask=random, mask=file, "
                          f"mask=diff_pruning, mask=width_core or mask=dense")
    if mask.name == "file":
        if not os.path.isfile(str(mask.get("path"))):
            raise ConfigError(f"mask.path={mask.get('path')!r} is not a file; point it at a saved mask, e.g. "
                              f"mask.path=outputs/<run>/mask.safetensors")
    elif mask.name not in ("dense", "width_core"):
        check_density(mask.get("density"), field="mask.density")
    always = mask.get("always")
    if always is not None and not (isinstance(always, str) or all(isinstance(p, str) for p in always)):
        raise ConfigError(f"mask.always={_show(always)} must be a glob pattern or a list of them, e.g. "
                          f"mask.always='[fc.*]'")
    check_mask_config(mask, cfg.steps, cfg.schedule)  # diff_pruning / width_core fields
    if mask.name == "fisher":
        from sparsecomm.fisher import METHODS

        if mask.get("method") not in METHODS:
            raise ConfigError(f"mask.method={mask.get('method')!r} is unknown; use one of {', '.join(METHODS)}")
        for key in ("num_samples", "batch_size", "chunk_size"):
            whole_number(mask.get(key), f"mask.{key}", 1, ConfigError)

    schedule = build_schedule(cfg)
    LRSchedule.from_config(cfg.schedule.get("lr", {}), schedule.steps)

    optim = cfg.optim
    if optim.get("name") not in OPTIMIZERS:
        raise ConfigError(f"optim.name={optim.get('name')!r} is unknown; use optim=adamw or optim=sgd")
    for key in ("lr", "dense_lr"):
        value = optim.get(key)
        if not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"optim.{key}={value!r} must be a positive number, e.g. optim.{key}=0.01")
    betas = optim.get("betas")
    if optim.name == "adamw" and not (len(betas) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool)
                                                              and 0 <= b < 1 for b in betas)):
        raise ConfigError(f"optim.betas={_show(betas)} must be two numbers in [0, 1), e.g. optim.betas='[0.9,0.999]'")
    try:
        resolve_wire_dtype(cfg.comm.get("wire_dtype"))
    except ValueError as e:
        raise ConfigError(f"comm.{e}") from None
    check_wandb(cfg.get("logging"))
    fault.check_config(cfg)


def config_hash(cfg: DictConfig) -> str:
    return hashlib.sha256(OmegaConf.to_yaml(cfg, resolve=True, sort_keys=True).encode()).hexdigest()
