"""Lottery-ticket sparse fine-tuning: the entries a short dense phase moved most.

Ansell et al., "Composable Sparse Fine-Tuning for Cross-Lingual Transfer" (ACL 2022; LT-SFT):
fine-tune every weight for a while, keep the k entries with the largest ``|theta - theta_0|``,
rewind the model to ``theta_0`` and fine-tune those k entries alone.

* :func:`snapshot`: ``theta_0``, a CPU float32 copy of the trainable parameters (4 bytes per entry).
* :func:`change_mask`: the top k of ``|theta - theta_0|`` (``always`` kept whole, ties by
  position). After dense DDP steps every rank holds the same weights, so every rank computes the
  same mask without sending anything (the digests are compared: one all-gather of 64 bytes).
  The dense phase itself is what the criterion costs on the wire: ``n x 4`` bytes a step.
* :func:`rewind`: copy ``theta_0`` back into the model (every trainable entry).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .mask import Mask, _unwrap, count_for_density, topk_mask


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU float32 copies of ``model``'s trainable parameters (name -> tensor)."""
    return {n: p.detach().to("cpu", torch.float32).clone() for n, p in _unwrap(model).named_parameters()
            if p.requires_grad}


def change_mask(model: nn.Module, initial: Mapping[str, torch.Tensor], *, density: float,
                always: Iterable[str] = (), process_group=None) -> Mask:
    """The top ``k = round(density x entries)`` of ``|theta - initial|``, identical on every rank
    that holds the same weights (collective: the digests are compared)."""
    model = _unwrap(model)
    params = dict(model.named_parameters())
    missing = [n for n in params if n not in initial]
    if missing:
        raise ValueError(f"the snapshot has no entry for parameter {missing[0]!r}: take it of this model")
    k = count_for_density(density, sum(p.numel() for p in params.values()))
    scores = {n: (p.detach().float() - initial[n].to(p.device)).abs() for n, p in params.items()}
    mask = topk_mask(scores, k, always)
    mask.assert_same_on_all_ranks(process_group)
    return mask


@torch.no_grad()
def rewind(model: nn.Module, initial: Mapping[str, torch.Tensor]) -> None:
    """Copy ``initial`` back into ``model``'s parameters of the same names, in place."""
    for n, p in _unwrap(model).named_parameters():
        if n in initial:
            p.copy_(initial[n].to(device=p.device, dtype=p.dtype))
