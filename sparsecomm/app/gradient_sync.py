"""The app's gradient sync: the DDP wrapper, the masked all-reduce hook or plain DDP, and the bytes sent."""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from sparsecomm.hook import register_masked_allreduce
from sparsecomm.mask import Mask


def wrap_ddp(module: torch.nn.Module, comm: Mapping, device: torch.device) -> DistributedDataParallel:
    """DDP per ``comm/``: gradients as views of DDP's buckets (one n-sized copy, not two), the
    bucket size, and whether rank 0's buffers are broadcast before every forward."""
    return DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True,
        bucket_cap_mb=comm.bucket_cap_mb, **_buffer_sync_kwargs(bool(comm.sync_buffers)))


def _buffer_sync_kwargs(sync: bool) -> dict[str, bool]:
    """DDP's per-forward buffer broadcast switch, by its name in this torch version."""
    if sync:
        return {}  # DDP's default
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


class GradientSync:
    """How gradients cross the network, and how many bytes that took.

    ``masked``: the masked all-reduce hook, registered once with a full mask in dense mode
    (dense steps send all n entries), switched to the real mask by :meth:`set_mask` and between
    masked and dense per step by :meth:`set_dense`, never re-registered. Otherwise plain DDP
    (mask=dense): every step sends all n entries, counted here.

    A run that swaps its model (mask=diff_pruning: model -> L0 wrapper -> plain model) builds a
    new one per model with ``previous=`` the old one: the counters go on. ``dense_bytes_per_step``
    counts each step as dense DDP of the plain model (the L0 wrapper all-reduces about 2x that).
    """

    def __init__(self, ddp: DistributedDataParallel, *, masked: bool, comm: Mapping,
                 previous: GradientSync | None = None, dense_bytes_per_step: int | None = None):
        self.state = None
        self._plain_steps = 0
        self.grad_bytes = sum(  # bytes of one dense all-reduce of this module's gradients
            p.numel() * p.element_size() for p in ddp.module.parameters() if p.requires_grad)
        if masked:
            self.state = register_masked_allreduce(ddp, Mask.full(ddp.module), wire_dtype=comm.wire_dtype,
                                                   fused=bool(comm.fused))
            self.state.dense = True
            if previous is not None:
                self.state.bytes_sent, self.state.dense_bytes = previous.bytes_sent, previous.dense_bytes
                self.state.steps = previous.state.steps if previous.state is not None else previous._plain_steps
        self._dense_per_step = dense_bytes_per_step

    def set_mask(self, mask) -> None:
        self.state.set_mask(mask)

    def set_dense(self, dense: bool) -> None:
        if self.state is not None:
            self.state.dense = dense

    def after_backward(self) -> None:
        if self.state is None:
            self._plain_steps += 1
        elif self._dense_per_step is not None:  # the hook counted this module's n_w x 4; count the plain model's
            self.state.dense_bytes += self._dense_per_step - self.grad_bytes

    def found_nonfinite(self, model: torch.nn.Module) -> bool:
        """Whether the step's all-reduced gradient holds NaN/Inf; every rank reaches the same verdict.

        Masked hook: its flag over the reduced values (k entries, or n on dense steps), no extra
        traffic. Plain DDP: the reduced gradients are identical on every rank, checked locally
        (one pass over n entries, nothing sent).
        """
        if self.state is not None:
            return self.state.found_nonfinite()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        return bool(grads) and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())

    def state_dict(self) -> dict[str, Any]:
        """Counters; the hook's mask digest is left out (a checkpoint stores the mask and its digest once)."""
        hook = None
        if self.state is not None:
            hook = {k: v for k, v in self.state.state_dict().items() if k != "mask_digest"}
        return {"hook": hook, "plain_steps": self._plain_steps}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        """Counters (and the hook's step/bytes); call after :meth:`set_mask` with the checkpoint's mask."""
        self._plain_steps = int(sd["plain_steps"])
        if self.state is not None and sd["hook"] is not None:
            self.state.load_state_dict(sd["hook"])

    @property
    def bytes_sent(self) -> int:
        return self.state.bytes_sent if self.state is not None else self._plain_steps * self.grad_bytes

    @property
    def dense_bytes(self) -> int:
        return self.state.dense_bytes if self.state is not None else self._plain_steps * self.grad_bytes
