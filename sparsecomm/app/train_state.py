"""The run's mutable state, in one place: what the trainer trains and with what.

:class:`TrainState` is the ONE owner of the model, the gradient sync (which holds the DDP
wrapper and its communication hook), the two optimizers, the mask, the step count and the
non-finite guard. Objects here are replaced (diff pruning swaps its model, a refresh swaps the
mask) only where a mask kind's :class:`~sparsecomm.app.masks.base.Change` is applied
(:mod:`sparsecomm.app.changes`) and where a checkpoint's mask loads; everything else reads them
from the state when it needs them, so nothing holds a stale reference. Nothing here crosses the
network but what building a sync (DDP broadcasts rank 0's weights) and setting a mask (ranks
compare its digest) send.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from sparsecomm.mask import Mask

from .comm import build_comm


@dataclass
class TrainState:
    """The model being trained, its sync (``sync.ddp`` the DDP wrapper), the dense optimizer (dense
    steps, mask=dense, comm options other than masked) and the masked one (built at the first
    mask, following it after), the mask, the steps done and the non-finite guard (None: a
    comparison run, whose steps are not checked)."""

    model: torch.nn.Module
    sync: Any
    dense_opt: torch.optim.Optimizer
    dense_lr: float
    sparse_opt: torch.optim.Optimizer | None = None
    sparse_lr: float | None = None
    mask: Mask | None = None
    step: int = 0
    nonfinite: Any = None

    @property
    def ddp(self) -> torch.nn.Module:
        """The DDP wrapper the step's forward runs through (the sync's)."""
        return self.sync.ddp

    def optimizer(self, dense: bool) -> tuple[torch.optim.Optimizer, float]:
        """The optimizer of a dense or a masked step and its base lr."""
        if dense or self.sparse_opt is None:
            return self.dense_opt, self.dense_lr
        return self.sparse_opt, self.sparse_lr


def new_state(cfg: Mapping, model: torch.nn.Module, device: torch.device, *, masked: bool, nonfinite: Any = None,
              dense_lr: float | None = None) -> TrainState:
    """``model`` (on ``device``) under DDP with the ``comm/`` option's sync (``masked`` False: a kind
    without a mask, ``comm=masked`` is plain DDP) and the option's dense optimizer (``optim/``'s, at
    ``dense_lr`` when given: the step sets it), no mask yet."""
    sync = build_comm(cfg.comm, model, device, masked=masked)
    optimizer, lr = sync.optimizer(cfg.optim)
    return TrainState(model, sync, optimizer, lr if dense_lr is None else float(dense_lr), nonfinite=nonfinite)


def swap_model(state: TrainState, model: torch.nn.Module, cfg: Mapping, device: torch.device, *,
               optimizer: tuple[torch.optim.Optimizer, float] | None = None,
               dense_bytes_per_step: int | None = None) -> None:
    """Train ``model`` from now on: a new DDP and hook (the byte counters go on), ``optimizer`` =
    (dense optimizer, lr) for its dense steps (default: the option's, ``optim/``'s dense one)."""
    state.sync = build_comm(cfg.comm, model, device, previous=state.sync, dense_bytes_per_step=dense_bytes_per_step)
    state.model = model
    state.dense_opt, state.dense_lr = optimizer if optimizer is not None else state.sync.optimizer(cfg.optim)


def use_mask(state: TrainState, mask: Mask, optim: Mapping, *, validate: bool = False) -> None:
    """``mask`` on the hook (collective: every rank holds this mask, or an error lists the digests)
    and on the option's masked optimizer (built at the first mask; at a refresh the state of entries that
    stay selected carries over). ``validate``: check first that it fits the model (a loaded one)."""
    if validate:
        mask.validate(state.model)
    state.sync.set_mask(mask)
    if state.sparse_opt is None:
        state.sparse_opt, state.sparse_lr = state.sync.optimizer(optim, mask)
    else:
        state.sparse_opt.reset_mask(mask)
    state.mask = mask


def buffer_bytes(model: torch.nn.Module, comm: Mapping, world: int) -> int:
    """What DDP's broadcast of rank 0's buffers (BatchNorm statistics) sends before every training
    forward (0 with ``comm.sync_buffers=false`` or one rank)."""
    if not comm.sync_buffers or world <= 1:
        return 0
    return sum(b.numel() * b.element_size() for b in model.buffers())
