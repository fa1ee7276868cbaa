"""``comm/``: how gradients cross the network, one option per file of ``conf/comm/``.

    dense       DDP's own all-reduce                  n x 4 bytes a step (fp32)
    fp16, bf16  torch's compression hooks             n x 2
    powersgd    torch's PowerSGD (rank r)             sum (n_i + m_i) r x 4 over matrices, vectors whole
    post_local  torch's post-local SGD + averaging    nothing on local steps, n x 4 every period-th
    masked      sparsecomm's masked all-reduce hook   k x 4 (k x 2 with a 2-byte wire)

(n: trainable entries; k: the entries the mask selects.) Usage, on every rank::

    sync = build_comm(cfg.comm, model, device)
    optimizer, lr = sync.optimizer(cfg.optim, mask)   # masked: over the mask's k entries; else dense
    loss_fn(sync.ddp(x), y).backward()     # the hook all-reduces
    sync.after_backward(); optimizer.step(); sync.after_update()
    sync.stats()   # {"comm", "bytes_sent", "dense_bytes", "ratio", "steps", "wire_dtype", "state_bytes", ...}

Only ``masked`` sends what a mask selects (``sync.uses_mask``); every other option trains every
entry with ``optim/``'s dense optimizer, and a mask kind is then unused.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from omegaconf import OmegaConf

from .comm_base import GradientSync
from .comm_masked import MaskedSync
from .comm_torch import CastSync, DenseSync, PostLocalSync, PowerSGDSync

# option name (conf/comm/<name>.yaml) -> its sync; tests check both ways
COMM_OPTIONS: dict[str, type[GradientSync]] = {
    "dense": DenseSync, "fp16": CastSync, "bf16": CastSync, "powersgd": PowerSGDSync,
    "post_local": PostLocalSync, "masked": MaskedSync,
}


def option(cfg: Mapping) -> type[GradientSync]:
    """The sync class ``cfg.name`` names; a ValueError listing the options otherwise."""
    try:
        return COMM_OPTIONS[str(cfg.name)]
    except KeyError:
        raise ValueError(f"comm={cfg.name} is not an option; use one of {', '.join(COMM_OPTIONS)}") from None


def uses_mask(cfg: Mapping) -> bool:
    """Whether option ``cfg.name`` sends what a mask selects (``masked``) rather than every entry."""
    return option(cfg).uses_mask


def build_comm(cfg: Mapping, model: torch.nn.Module, device: torch.device, *, masked: bool = True,
               previous: GradientSync | None = None, dense_bytes_per_step: int | None = None) -> GradientSync:
    """DDP over ``model`` with the hook of ``cfg`` (the ``comm`` group), counting what it sends.

    ``masked=False`` (the mask kind trains densely: ``mask=dense``) makes ``comm=masked`` plain
    DDP (``comm=dense`` with the same DDP settings); other options send as they always do.
    ``previous``: the sync this one replaces (its counters go on); ``dense_bytes_per_step``: count
    each step as dense DDP of another model. Collective: every rank calls it.
    """
    cls = option(cfg)
    if cls.uses_mask and not masked:
        cfg = OmegaConf.create({"name": "dense", "bucket_cap_mb": cfg.bucket_cap_mb, "sync_buffers": cfg.sync_buffers})
        cls = DenseSync
    return cls(cfg, model, device, previous=previous, dense_bytes_per_step=dense_bytes_per_step)
