"""The app's configuration checked in one place, and its one hash.

Types and defaults are the schema's (:mod:`sparsecomm.app.schema`): OmegaConf refuses a value of
the wrong type while Hydra composes, and :func:`composition_error` turns its message into ours.
Everything else is checked here, before any rank starts, by :func:`check_config`: ranges
(:data:`BOUNDS`), the fields that take more than one type (:data:`UNION_TYPES`), the choices
(mask kinds, optimizers, backends, ...), the files a run reads and the rules between fields
(diff pruning's ``l0_steps`` vs ``steps``, the schedule, the cluster vs this machine, wandb).
Every error is a :class:`ConfigError` (or a library ValueError) whose message names the field and
the fix; the app prints it as one line.

:func:`config_hash` is the config's one hash: what the ranks compare to prove they run the same
training config, and what a checkpoint records (a resumed run must match it).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf, nodes
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from sparsecomm.diff_pruning import _check_gate_args
from sparsecomm.fisher import METHODS
from sparsecomm.mask import check_density
from sparsecomm.width_core import check_fraction
from . import schema
from .fields import whole_number
from .schedule import LRSchedule, Schedule

MASK_KINDS = tuple(schema.OPTIONS["mask"])
DENSITY_KINDS = tuple(k for k, node in schema.OPTIONS["mask"].items() if issubclass(node, schema.SparseMask))
OPTIMIZERS = tuple(schema.OPTIONS["optim"])
BACKENDS = ("gloo", "nccl", "mpi")
DEVICES = ("cpu", "cuda")
START_METHODS = ("spawn", "fork", "forkserver")
WANDB_MODES = ("offline", "online", "disabled")
RESUME_MODES = ("auto", "never")
# Config fields a resumed run may change: where and how it runs, what it logs. Everything else
# (task, mask, schedule, optim, steps, batch_size, seed, comm) must match the checkpoint's.
RESUME_FREE = ("cluster", "checkpoint", "logging", "out_dir", "run_id", "num_workers", "eval_every",
               "eval_batch_size", "save_model", "nonfinite", "stop_sweep_on_failure")


class ConfigError(ValueError):
    """A config value the app cannot run with; the message names the field and the fix.

    ``collective``: a function of the config, which every rank holds alike, so every rank raises it
    and rank 0's line is enough.
    """

    collective = True


class ClusterError(ConfigError):
    """The cluster config does not fit this machine or environment; the message names the field."""

    collective = False  # also raised by one node's environment (its GPUs, its scontrol)


# --- the fields the schema types as Any (they take more than one type); None: null -----------------
UNION_TYPES: dict[str, tuple] = {
    "cluster.nproc_per_node": (int, str), "mask.always": (str, list, None),
    "schedule.core_full": (str, int, float, None),
}
# Numeric ranges: (low, high, low exclusive); high None: no upper bound.
BOUNDS: dict[str, tuple] = {
    "steps": (1, 10**12, False), "batch_size": (1, None, False), "eval_batch_size": (1, None, False),
    "eval_every": (0, None, False), "num_workers": (0, 256, False), "seed": (0, 2**63 - 1, False),
    "comm.bucket_cap_mb": (0, 1e6, True), "checkpoint.every": (0, None, False), "checkpoint.keep": (1, None, False),
    "nonfinite.max_in_a_row": (1, None, False),
    "cluster.max_restarts": (0, 1000, False), "cluster.nproc_per_node": (1, 4096, False),
    "cluster.nnodes": (1, 100_000, False), "cluster.num_threads": (1, 4096, False),
    "cluster.timeout_s": (1, 7 * 24 * 3600, False),
    "cluster.master_port": (1, 65535, False),
    "cluster.link.inter_node_gbit": (0, None, True), "cluster.link.intra_node_gbit": (0, None, True),
    "schedule.dense_steps": (0, None, False), "schedule.refresh_every": (0, None, False),
    "schedule.lr.warmup_steps": (0, None, False), "schedule.lr.min_ratio": (0, 1, False),
    "optim.lr": (0, None, True), "optim.dense_lr": (0, None, True), "optim.eps": (0, None, True),
    "optim.weight_decay": (0, 10, False), "optim.momentum": (0, 1, False),  # decay x lr beyond 1 flips weights
    "mask.seed": (0, 2**63 - 1, False), "mask.num_samples": (1, None, False), "mask.batch_size": (1, None, False),
    "mask.chunk_size": (1, None, False), "mask.l0_steps": (1, None, False), "mask.alone_lr": (0, None, True),
    # diff pruning's gates: sigmoid saturates long before these bounds; beyond them float32 overflows
    "mask.log_alpha_init": (-100, 100, False), "mask.temperature": (0, 100, True), "mask.alpha_lr": (0, 1e3, True),
    "mask.l0_penalty": (0, 1e3, False),
    "task.seed": (0, 2**32 - 1, False), "task.test_fraction": (0, 1, True), "task.num_classes": (2, 100_000, False),
    "logging.log_every": (1, None, False),
    # sizes that allocate: bounded so that a typo's 10**12 is an error, not an out-of-memory crash
    "task.num_train": (1, 10**8, False), "task.num_test": (1, 10**8, False), "task.in_features": (1, 10**6, False),
    "task.hidden": (1, 10**6, False), "task.depth": (1, 10**4, False), "task.vocab_size": (1, 10**7, False),
    "task.n_layer": (1, 10**4, False), "task.n_head": (1, 10**4, False), "task.n_embd": (1, 10**6, False),
    "task.block_size": (1, 10**6, False), "task.train_size": (1, 10**8, False),
    "task.test_size": (1, 10**8, False), "task.max_length": (1, 10**5, False),
}
_KINDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string", list: "a list",
          dict: "a mapping", None: "null"}


def _show(value) -> str:
    text = repr(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind(value) -> type | None:
    if value is None:
        return None
    if isinstance(value, (ListConfig, list, tuple)):
        return list
    if isinstance(value, (DictConfig, Mapping)):
        return dict
    return type(value)


# --- Hydra's type errors, in our words -------------------------------------------------------------

def _node_kind(node) -> str:
    """What a field of the schema takes, in words: "a whole number", "a mapping of project, ... or null"."""
    for cls, kind in ((nodes.BooleanNode, bool), (nodes.IntegerNode, int), (nodes.FloatNode, float),
                      (nodes.StringNode, str), (ListConfig, list), (DictConfig, dict)):
        if isinstance(node, cls):
            text = _KINDS[kind]
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
    shown = typed if typed is not None else _show(getattr(cause, "value", None) if cause is not None else None)
    return ConfigError(f"{key}={shown} must be {_node_kind(field)}{example}")


def strict_bool_error(base: DictConfig, key: str, value: Any, overrides: list[str]) -> ConfigError | None:
    """OmegaConf takes 0, 1, "yes", ... for a boolean field; the app wants true or false."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(base, parent, default=None) if parent else base
    field = node._get_node(leaf) if isinstance(node, DictConfig) and leaf in node else None
    if not isinstance(field, nodes.BooleanNode) or isinstance(value, bool) or (value is None and field._is_optional()):
        return None
    if isinstance(value, str) and value.startswith("${"):
        return None  # an interpolation: checked once resolved
    return composition_error(None, base, overrides, key=key)


# --- every leaf: the fields of more than one type, and the ranges -------------------------------

def check_values(cfg: DictConfig, prefix: str = "") -> None:
    """The fields of :data:`UNION_TYPES` hold one of their types; the numbers of :data:`BOUNDS` lie in range."""
    for key in cfg.keys():
        if key == "hydra":
            continue
        path = f"{prefix}{key}"
        value = OmegaConf.select(cfg, str(key), throw_on_resolution_failure=False)
        if isinstance(value, DictConfig):
            check_values(value, f"{path}.")
            continue
        types = UNION_TYPES.get(path)
        if types is not None and not (_kind(value) in types or (_kind(value) is float and int in types
                                                                 and float(value).is_integer())):
            want = " or ".join(_KINDS[t] for t in types if not (t is int and float in types))
            raise ConfigError(f"{path}={_show(value)} must be {want}")
        if path in BOUNDS and isinstance(value, (int, float)) and not isinstance(value, bool):
            low, high, exclusive = BOUNDS[path]
            bad = (not math.isfinite(value) or (value <= low if exclusive else value < low)
                   or (high is not None and value > high))
            if bad:
                span = f"{'>' if exclusive else '>='} {low}" + (f" and <= {high:g}" if high is not None else "")
                raise ConfigError(f"{path}={_show(value)} is out of range: it must be {span}")


# --- the groups -----------------------------------------------------------------------------------

def visible_gpus(field: str, value: Any) -> int:
    """How many GPUs torch sees; :class:`ClusterError` naming ``field`` if none."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        fix = ("set cluster.nproc_per_node=N or use cluster=local_cpu" if field == "cluster.nproc_per_node" else
               "use cluster=local_cpu (or cluster.backend=gloo cluster.device=cpu)")
        what = "counts GPUs, and torch sees none" if value == "auto" else \
            "needs CUDA GPUs, but torch sees none on this machine"
        raise ClusterError(f"{field}={value} {what}; {fix}")
    return n


def _count(environ: Mapping[str, str], key: str) -> int | None:
    value = str(environ.get(key, "")).split("(")[0]  # SLURM_CPUS_ON_NODE may read "4(x2)"
    return int(value) if value.isdigit() else None


def check_slurm_allocation(cluster: Mapping, environ: Mapping[str, str]) -> None:
    """Inside a Slurm job: the GPUs the config needs against those Slurm gave this node, named.

    (A job whose request no node can satisfy never starts, so nothing here can see it: ``sinfo -o
    "%N %c %G"`` lists what the nodes have.)"""
    job = environ.get("SLURM_JOB_ID")
    if not job:
        return
    gpus = _count(environ, "SLURM_GPUS_ON_NODE")
    if gpus is None and environ.get("CUDA_VISIBLE_DEVICES"):
        gpus = len([d for d in environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()])
    if cluster["backend"] == "nccl" or cluster["device"] == "cuda":
        field, value = ("cluster.backend", "nccl") if cluster["backend"] == "nccl" else ("cluster.device", "cuda")
        if not gpus:
            raise ClusterError(f"{field}={value} needs GPUs, but Slurm job {job} has none on this node "
                               f"(SLURM_GPUS_ON_NODE unset); submit with --gpus-per-node=N, or use "
                               f"cluster.backend=gloo cluster.device=cpu")
        nproc = cluster["nproc_per_node"]
        if str(nproc).isdigit() and int(nproc) > gpus:
            raise ClusterError(f"cluster.nproc_per_node={nproc} workers on {field}={value}, but Slurm job {job} has "
                               f"{gpus} GPU(s) on this node; submit with --gpus-per-node={nproc} or set "
                               f"cluster.nproc_per_node={gpus}")


def check_cluster(cluster: Mapping) -> None:
    """A cluster config this machine can run: choices, counts, GPUs for nccl/cuda."""
    for key, choices in (("backend", BACKENDS), ("device", DEVICES), ("start_method", START_METHODS)):
        if cluster.get(key) not in choices:
            raise ClusterError(f"cluster.{key}={cluster.get(key)!r} is unknown; use one of {', '.join(choices)}")
    whole_number(cluster["nnodes"], "cluster.nnodes", 1, ClusterError)
    check_slurm_allocation(cluster, os.environ)
    if cluster["backend"] == "nccl" or cluster["device"] == "cuda":
        field, value = ("cluster.backend", "nccl") if cluster["backend"] == "nccl" else ("cluster.device", "cuda")
        visible_gpus(field, value)
    nproc = cluster["nproc_per_node"]
    if str(nproc) == "auto":
        visible_gpus("cluster.nproc_per_node", "auto")
    else:
        whole_number(nproc, "cluster.nproc_per_node", 1, ClusterError)


def check_mask(mask: DictConfig) -> None:
    """The ``mask`` group: its kind, its file, its density and its kind's own fields."""
    if mask.get("name") not in MASK_KINDS:
        raise ConfigError(f"mask.name={mask.get('name')!r} is unknown; use "
                          f"{', '.join(f'mask={k}' for k in MASK_KINDS)}")
    if mask.name == "file" and not os.path.isfile(str(mask.path)):
        raise ConfigError(f"mask.path={mask.path!r} is not a file; point it at a saved mask, e.g. "
                          f"mask.path=outputs/<run>/mask.safetensors")
    if mask.name in DENSITY_KINDS:
        check_density(mask.density, field="mask.density")
    always = mask.get("always")
    if always is not None and not (isinstance(always, str) or all(isinstance(p, str) for p in always)):
        raise ConfigError(f"mask.always={_show(always)} must be a glob pattern or a list of them, e.g. "
                          f"mask.always='[fc.*]'")
    if mask.name == "fisher" and mask.method not in METHODS:
        raise ConfigError(f"mask.method={mask.method!r} is unknown; use one of {', '.join(METHODS)}")
    if mask.name == "width_core":
        try:
            check_fraction(mask.fraction, field="mask.fraction")
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if mask.name == "diff_pruning":
        try:
            l, r = (float(v) for v in mask.stretch)
            _check_gate_args(l, r, mask.temperature)
        except (TypeError, ValueError):
            raise ConfigError(f"mask.stretch={_show(mask.stretch)} must be [l, r] with l < 0 and r > 1, e.g. "
                              f"mask.stretch=[-1.5,1.5]") from None


def check_schedule(cfg: DictConfig) -> None:
    """The step plan (``schedule``, ``schedule/lr``) and diff pruning's L0 phase inside it."""
    mask = cfg.mask
    masked = mask.name != "dense" and OmegaConf.get_type(cfg.comm).uses_mask  # comm=fp16, ...: the mask is unused
    schedule = Schedule.from_config(cfg.schedule, cfg.steps, cfg.seed, masked=masked)
    LRSchedule.from_config(cfg.schedule.lr, schedule.steps)
    if mask.name != "diff_pruning" or not masked:
        return
    dense, l0 = schedule.dense_steps, mask.l0_steps
    if dense + l0 >= schedule.steps:
        raise ConfigError(
            f"mask.l0_steps={l0} leaves no fixed-mask step: schedule.dense_steps={dense} + mask.l0_steps={l0} "
            f"must be < steps={schedule.steps}; lower mask.l0_steps or raise steps")
    if schedule.refresh_every:
        raise ConfigError(
            f"schedule.refresh_every={schedule.refresh_every} with mask=diff_pruning: the diff-pruning mask "
            f"is projected once, after the L0 phase; use schedule.refresh_every=0 (e.g. schedule=fish_fixed)")


def check_optim(optim: DictConfig) -> None:
    if optim.get("name") not in OPTIMIZERS:
        raise ConfigError(f"optim.name={optim.get('name')!r} is unknown; use "
                          f"{' or '.join(f'optim={k}' for k in OPTIMIZERS)}")
    if optim.name == "adamw" and not (len(optim.betas) == 2 and all(0 <= b < 1 for b in optim.betas)):
        raise ConfigError(f"optim.betas={_show(optim.betas)} must be two numbers in [0, 1), "
                          f"e.g. optim.betas='[0.9,0.999]'")


def check_wandb(logging: Any) -> None:
    """``logging.wandb`` off, or a known mode and the wandb package installed."""
    wb = logging.get("wandb") if logging is not None else None
    if not wb:
        return
    if wb.get("mode") not in WANDB_MODES:
        raise ConfigError(f"logging.wandb.mode={wb.get('mode')!r} is unknown; use one of {', '.join(WANDB_MODES)}")
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError(
            "logging.wandb is set (logging=wandb), which needs the wandb package, and it is not installed: "
            "pip install 'sparsecomm[wandb]', or use logging=default") from None


def check_checkpoint(ck: DictConfig) -> None:
    resume = ck.resume
    if resume is None or str(resume).strip() == "":
        raise ConfigError("checkpoint.resume is empty; use auto, never or the path of a checkpoint file or folder")
    if str(resume) not in RESUME_MODES and not os.path.exists(str(resume)):
        raise ConfigError(
            f"checkpoint.resume={resume!r} is neither auto, never nor an existing checkpoint file or folder; "
            f"fix the path or use checkpoint.resume=auto")
    if ck.dir is not None and os.path.exists(str(ck.dir)) and not os.path.isdir(str(ck.dir)):
        raise ConfigError(f"checkpoint.dir={ck.dir!r} is a file, not a folder; point it at a folder")


def check_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` (or the library's ValueError) naming the first bad field."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        raise ConfigError(f"{e.full_key} is required but not set; add {e.full_key}=... to the command line") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{getattr(e, 'full_key', '') or 'config'}: {str(e).splitlines()[0]}") from None
    check_values(cfg)
    check_cluster(cfg.cluster)
    if not cfg.get("task") or "_target_" not in cfg.task:
        raise ConfigError("task has no _target_; pick a task config, e.g. task=digits")
    check_mask(cfg.mask)
    check_schedule(cfg)
    check_optim(cfg.optim)
    try:
        OmegaConf.to_object(cfg.comm).check(cfg)  # the comm option's own fields (comm_schema.py)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_wandb(cfg.logging)
    check_checkpoint(cfg.checkpoint)


# --- the one hash ---------------------------------------------------------------------------------

def training_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config without :data:`RESUME_FREE`: what a resumed run must share."""
    container = OmegaConf.to_container(cfg, resolve=True)
    return {k: v for k, v in container.items() if k not in RESUME_FREE and k != "hydra"}


def config_hash(cfg: DictConfig) -> str:
    """SHA-256 of the training config (:func:`training_config`, keys sorted): the ranks compare it
    before training, a checkpoint records it, a resumed run must match it."""
    return hashlib.sha256(OmegaConf.to_yaml(OmegaConf.create(training_config(cfg)), sort_keys=True).encode()).hexdigest()
