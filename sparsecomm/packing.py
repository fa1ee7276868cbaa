"""Packing plans: where the masked entries of a flat gradient buffer are, and moving them.

A DDP bucket is one flat 1-D buffer holding the gradients of ``bucket.parameters()`` back to
back (offsets are the running sum of their ``numel``). A :class:`PackPlan` is the int64 vector
of positions in that buffer that the shared mask selects, in ascending order. Packing gathers
those k values into a contiguous buffer; unpacking scatters k values back. Both cost O(k).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackPlan:
    """Selected positions of one flat buffer built from ``params`` (identity and order matter)."""

    params: tuple[torch.Tensor, ...]
    index: torch.Tensor  # int64, shape (k,), on the buffer's device, ascending
    numel: int  # length of the flat buffer

    @property
    def k(self) -> int:
        return int(self.index.numel())

    def matches(self, params: Sequence[torch.Tensor]) -> bool:
        """True if ``params`` are the very tensors, in the same order, this plan was built for.

        DDP rebuilds its buckets after the first iteration: the same bucket index may then hold
        other parameters or the same ones in another order, so a plan is never reused by index
        or size alone.
        """
        return len(params) == len(self.params) and all(a is b for a, b in zip(params, self.params))


def build_plan(params: Sequence[torch.Tensor], bits: Mapping[torch.Tensor, torch.Tensor],
               device: torch.device) -> PackPlan:
    """Plan for a flat buffer laid out as ``params`` back to back.

    ``bits`` maps each parameter tensor to its selected entries: the int64 ascending flat
    positions (:meth:`sparsecomm.Mask.flat_indices`, the layout the masked optimizers share), or
    its flat bool mask. Parameters absent from ``bits`` are treated as fully unselected.
    """
    pieces, offset = [], 0
    for p in params:
        b = bits.get(p)
        if b is not None:
            positions = b.reshape(-1).nonzero().reshape(-1) if b.dtype == torch.bool else b
            pieces.append(positions + offset)
        offset += p.numel()
    index = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int64)
    return PackPlan(tuple(params), index.to(device=device, dtype=torch.int64), offset)


def pack(buffer: torch.Tensor, plan: PackPlan) -> torch.Tensor:
    """Gather the k selected values of a flat buffer: shape (k,), the buffer's dtype, a new tensor."""
    return buffer.index_select(0, plan.index)


def unpack_(buffer: torch.Tensor, plan: PackPlan, values: torch.Tensor) -> torch.Tensor:
    """Write ``values`` (k,) into the selected positions of ``buffer`` in place; returns ``buffer``."""
    return buffer.index_copy_(0, plan.index, values.to(buffer.dtype))
