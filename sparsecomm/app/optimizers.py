"""``optim/``: torch's AdamW/SGD for dense steps, the library's masked ones over a mask.

Nothing here touches the network: a masked optimizer updates the k selected entries of the
gradient that the hook all-reduced (see :mod:`sparsecomm.optim`).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from sparsecomm.mask import Mask
from sparsecomm.optim import MaskedAdamW, MaskedSGD

from .units import tensor_bytes


def optimizer_kwargs(cfg: Mapping) -> dict[str, Any]:
    """``optim/``'s hyperparameters, as torch's AdamW/SGD (and the masked ones) take them."""
    if cfg.name == "adamw":
        kw = dict(betas=tuple(cfg.betas), eps=float(cfg.eps))
    else:
        kw = dict(momentum=float(cfg.momentum), nesterov=bool(cfg.nesterov))
    return {**kw, "weight_decay": float(cfg.weight_decay)}


def dense_optimizer(cfg: Mapping, params, lr: float) -> torch.optim.Optimizer:
    """torch's AdamW/SGD per ``optim/`` over ``params`` (tensors or param groups) at ``lr``."""
    return (torch.optim.AdamW if cfg.name == "adamw" else torch.optim.SGD)(params, lr=lr, **optimizer_kwargs(cfg))


def build_optimizer(cfg: Mapping, model: torch.nn.Module, mask: Mask | None = None) -> tuple[torch.optim.Optimizer, float]:
    """``(optimizer, base lr)``: masked over ``mask`` at ``optim.lr``, else dense at ``optim.dense_lr``."""
    if mask is None:
        lr = float(cfg.dense_lr)
        return dense_optimizer(cfg, [p for p in model.parameters() if p.requires_grad], lr), lr
    lr = float(cfg.lr)
    masked = MaskedAdamW if cfg.name == "adamw" else MaskedSGD
    return masked(model, mask, lr=lr, **optimizer_kwargs(cfg)), lr


def optimizer_state_bytes(optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes of the optimizer's state tensors: AdamW's two moments of n entries and a step counter
    per parameter, a masked optimizer's two moments of k entries (its packed values aside)."""
    if optimizer is None:
        return 0
    return sum(tensor_bytes(st) for st in optimizer.state.values())
