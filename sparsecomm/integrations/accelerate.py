"""Accelerate: after ``accelerator.prepare``, one call turns the DDP model and its optimizer masked.

Usage (``torchrun --nproc_per_node N script.py`` or ``accelerate launch``; on a machine without
GPU ``Accelerator(cpu=True)`` is what makes Accelerate wrap the model in DDP over Gloo)::

    from sparsecomm.integrations.accelerate import prepare_masked

    accelerator = Accelerator(cpu=True)
    model, loader = accelerator.prepare(model, loader)
    mask = sparsecomm.fisher_mask(model, batches, loss_fn, density=0.005)   # or random_mask, Mask.load
    optimizer, comm = prepare_masked(accelerator, model, torch.optim.AdamW(model.parameters(), lr=1e-3), mask)
    for x, y in loader:
        accelerator.backward(loss_fn(model(x), y))   # the hook all-reduces k values
        optimizer.step(); optimizer.zero_grad()

``prepare_masked`` registers :func:`sparsecomm.masked_allreduce_hook` on the prepared DDP model
(Accelerate's own ``DistributedDataParallelKwargs(comm_hook=...)`` only takes torch's built-in
hooks), checks that every rank holds the same mask digest, and replaces the optimizer by its
masked counterpart (AdamW -> :class:`~sparsecomm.MaskedAdamW`, SGD -> :class:`~sparsecomm.MaskedSGD`,
same hyperparameters) prepared by Accelerate (an ``AcceleratedOptimizer``, so
``accelerator.accumulate``, ``clip_grad_norm_`` and ``save_state`` see it). Build the LR
scheduler on the returned optimizer.

On the wire, per synchronised step and rank: one all-reduce of k values (4k bytes in fp32, 2k
with ``wire_dtype="bf16"``), no index; steps inside ``accelerator.accumulate``'s ``no_sync`` send
nothing. ``mixed_precision="fp16"`` (a GradScaler) is refused: the scaler cannot see the packed
gradients; bf16 works.
"""
from __future__ import annotations

import torch
from torch import nn

try:
    from accelerate import Accelerator
except ImportError as e:  # an optional dependency: say how to get it
    raise ImportError(f"sparsecomm.integrations.accelerate needs accelerate ({e}): "
                      f"pip install 'sparsecomm[accelerate]'") from e

from ..hook import MaskedAllReduceState, register_masked_allreduce
from ..mask import Mask
from .common import masked_counterpart, require_ddp_when_distributed


def prepare_masked(accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, mask: Mask, *,
                   wire_dtype=None, fused: bool = True) -> tuple[torch.optim.Optimizer, MaskedAllReduceState | None]:
    """``(masked AcceleratedOptimizer, hook state)`` for ``model`` as ``accelerator.prepare`` returned it.

    Collective: every rank calls it with the same mask (the digests are compared). ``optimizer``:
    the stock AdamW/SGD to replace, prepared or not (a prepared one is dropped from the
    accelerator). The hook state is ``None`` in a one-process run (nothing to send).
    """
    if accelerator.scaler is not None:
        raise ValueError("Accelerator(mixed_precision='fp16') uses a GradScaler, which cannot see the masked "
                         "optimizer's packed gradients; use mixed_precision='bf16' or 'no'")
    state = None
    if require_ddp_when_distributed(model, "accelerator.prepare", "on a machine without GPU create "
                                           "Accelerator(cpu=True), and pass the model to prepare first"):
        state = register_masked_allreduce(model, mask, wire_dtype=wire_dtype, fused=fused)
    masked = masked_counterpart(optimizer, accelerator.unwrap_model(model), mask)
    accelerator._optimizers = [o for o in accelerator._optimizers if o is not optimizer]
    return accelerator.prepare_optimizer(masked), state
