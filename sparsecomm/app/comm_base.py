"""What every ``comm/`` option shares: the DDP wrapper, the byte counters, the NaN/Inf verdict.

A :class:`GradientSync` is one option of the ``comm`` config group, built by
:func:`sparsecomm.app.comm.build_comm`: it wraps the model in DDP (gradients as views of DDP's
buckets, always), registers its communication hook and counts, per rank, the payload bytes each
all-reduce is handed (``bytes_sent``) against what dense DDP would hand over for the same steps
(``dense_bytes``: every gradient entry in its dtype, once a step). A ring all-reduce then puts
about ``2 (N-1)/N`` times the payload on the link. DDP's broadcast of rank 0's buffers
(``comm.sync_buffers``) is not a gradient all-reduce and is counted apart by the trainer.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from ..distributed import let_comm_threads_finish_at_exit
from .optimizers import build_optimizer


def wrap_ddp(module: torch.nn.Module, comm: Mapping, device: torch.device) -> DistributedDataParallel:
    """DDP per ``comm/``: gradients as views of DDP's buckets (one n-sized copy, not two), the
    bucket size, and whether rank 0's buffers are broadcast before every forward."""
    let_comm_threads_finish_at_exit()
    return DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True,
        bucket_cap_mb=comm.bucket_cap_mb, **_buffer_sync_kwargs(bool(comm.sync_buffers)))


def _buffer_sync_kwargs(sync: bool) -> dict[str, bool]:
    """DDP's per-forward buffer broadcast switch, by its name in this torch version."""
    if sync:
        return {}  # DDP's default
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def grad_bytes_of(module: torch.nn.Module) -> int:
    """Bytes of one dense all-reduce of ``module``'s gradients: every trainable entry in its dtype."""
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)


@dataclass
class Tally:
    """The counters of every option (a hook state holds one and adds what it hands to all-reduce).

    ``bytes_sent``: payload bytes this rank handed to all-reduce; ``dense_bytes``: what dense DDP
    would have handed over for the same steps; ``steps``: synchronised backward passes.
    """

    bytes_sent: int = 0
    dense_bytes: int = 0
    steps: int = 0


class GradientSync:
    """One ``comm/`` option: DDP, its hook and the bytes it sent (subclasses: one per option).

    ``previous``: the sync of the model this one replaces (diff pruning swaps models): the
    counters go on. ``dense_bytes_per_step``: count each step as dense DDP of another model
    (diff pruning's L0 wrapper all-reduces about 2x the plain model's gradients).
    Subclasses set ``name`` and register their hook in :meth:`_register`; the hook adds to
    ``self.tally.bytes_sent`` (the dense option, whose all-reduce is DDP's C++ one, counts in
    :meth:`_count_step`).
    """

    name = ""
    uses_mask = False  # the masked hook alone sends what a mask selects
    wire_dtype: str | None = None  # what the entries travel in (None: the gradient's dtype)

    def __init__(self, cfg: Mapping, module: torch.nn.Module, device: torch.device, *,
                 previous: GradientSync | None = None, dense_bytes_per_step: int | None = None):
        self.cfg = cfg
        self.ddp = wrap_ddp(module, cfg, device)
        self.grad_bytes = grad_bytes_of(module)
        self._dense_per_step = self.grad_bytes if dense_bytes_per_step is None else int(dense_bytes_per_step)
        self.tally = self._register()
        if previous is not None:
            self.tally.bytes_sent, self.tally.dense_bytes = previous.bytes_sent, previous.dense_bytes
            self.tally.steps = previous.steps

    # --- what subclasses provide ----------------------------------------------------------------
    def _register(self) -> Tally:
        """Register the option's hook on ``self.ddp``; return the counters it adds to."""
        raise NotImplementedError

    def _count_step(self) -> None:
        """After a synchronised backward: one more step, dense DDP's bytes for it."""
        self.tally.steps += 1
        self.tally.dense_bytes += self._dense_per_step

    def optimizer(self, optim: Mapping, mask=None) -> tuple[torch.optim.Optimizer, float]:
        """``(optimizer, base lr)`` this option trains with: ``optim/``'s dense one over every
        entry at ``optim.dense_lr`` (a mask is unused: every entry crosses)."""
        return build_optimizer(optim, self.ddp.module)

    def option_stats(self) -> dict[str, Any]:
        """The option's own numbers for :meth:`stats` (its settings, what its hook keeps)."""
        return {"state_bytes": 0}

    # --- the step -------------------------------------------------------------------------------
    def set_mask(self, mask) -> None:
        raise TypeError(f"comm={self.name} sends every gradient entry and takes no mask; "
                        f"use comm=masked to send the entries a mask selects")

    def set_dense(self, dense: bool) -> None:
        """Dense or masked steps: only the masked option tells them apart; every other sends as it does."""

    def after_backward(self) -> None:
        """Called once after every synchronised backward pass (the hook has run)."""
        self._count_step()

    def after_update(self) -> None:
        """Called after the optimizer's update, while gradients exist (post-local averages here)."""

    def found_nonfinite(self, model: torch.nn.Module) -> bool:
        """Whether the step's all-reduced gradient holds NaN/Inf; every rank reaches the same verdict.

        The reduced gradients are identical on every rank: checked locally, one pass over the n
        entries, nothing sent.
        """
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        return bool(grads) and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())

    # --- reporting and checkpoints --------------------------------------------------------------
    @property
    def bytes_sent(self) -> int:
        return self.tally.bytes_sent

    @property
    def dense_bytes(self) -> int:
        return self.tally.dense_bytes

    @property
    def steps(self) -> int:
        return self.tally.steps

    def stats(self) -> dict[str, Any]:
        """What crossed the wire: ``comm``, ``bytes_sent``, ``dense_bytes``, ``ratio`` (sent /
        dense), ``steps``, ``wire_dtype``, ``state_bytes`` (memory the hook keeps between steps)
        and the option's own numbers. The same keys on every rank."""
        sent, dense = self.bytes_sent, self.dense_bytes
        return {"comm": self.name, "bytes_sent": sent, "dense_bytes": dense,
                "ratio": sent / dense if dense else float("nan"), "steps": self.steps,
                "wire_dtype": self.wire_dtype, **self.option_stats()}

    def state_dict(self) -> dict[str, Any]:
        """The counters and the option's own state (:meth:`option_state`)."""
        return {"comm": self.name, "bytes_sent": self.bytes_sent, "dense_bytes": self.dense_bytes,
                "steps": self.steps, "option": self.option_state()}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        if sd.get("comm") != self.name:
            raise ValueError(f"the sync state was saved by comm={sd.get('comm')}, this run uses comm={self.name}")
        self.tally.bytes_sent, self.tally.dense_bytes = int(sd["bytes_sent"]), int(sd["dense_bytes"])
        self.tally.steps = int(sd["steps"])
        self.load_option_state(sd["option"])

    def option_state(self) -> dict[str, Any]:
        return {}

    def load_option_state(self, sd: Mapping[str, Any]) -> None:
        pass
