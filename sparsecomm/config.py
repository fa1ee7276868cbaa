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
from .phases import build_schedule, check_mask_config
from .schedule import LRSchedule

MASK_KINDS = ("fisher", "random", "dense", "file", "diff_pruning", "width_core")
OPTIMIZERS = ("adamw", "sgd")


class ConfigError(ValueError):
    """A config value the app cannot run with; the message names the field and the fix."""


def check_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` (or the library's ValueError) naming the first bad field."""
    from .hook import resolve_wire_dtype
    from .mask import check_density

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
    check_mask_config(mask, cfg.steps, cfg.schedule)  # diff_pruning / width_core fields
    if mask.name == "fisher":
        from .fisher import METHODS

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
    try:
        resolve_wire_dtype(cfg.comm.get("wire_dtype"))
    except ValueError as e:
        raise ConfigError(f"comm.{e}") from None
    check_wandb(cfg.get("logging"))
    fault.check_config(cfg)


def config_hash(cfg: DictConfig) -> str:
    return hashlib.sha256(OmegaConf.to_yaml(cfg, resolve=True, sort_keys=True).encode()).hexdigest()
