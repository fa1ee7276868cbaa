"""What the stack integrations share: the masked optimizer that replaces a stock one, the check
that a multi-process run really was wrapped in DDP, rank 0's weights for a mask scored before
DDP wraps the model, and Fisher scoring on Hugging Face batches. Needs none of the stacks."""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import distributed as sdist
from ..mask import Mask
from ..modelio import logits_of
from ..optim import MaskedAdamW, MaskedSGD

_HYPER = {MaskedAdamW: ("lr", "betas", "eps", "weight_decay", "amsgrad"),
          MaskedSGD: ("lr", "momentum", "dampening", "weight_decay", "nesterov")}


def masked_counterpart(optimizer: torch.optim.Optimizer, model: nn.Module, mask: Mask) -> MaskedAdamW | MaskedSGD:
    """The masked optimizer with ``optimizer``'s hyperparameters: AdamW -> :class:`MaskedAdamW`,
    SGD -> :class:`MaskedSGD` (over the mask's k entries of ``model``; its state has k entries).

    ``optimizer`` must be a ``torch.optim.AdamW`` or ``SGD`` (unwrapped from any ``.optimizer``
    wrapper) whose parameter groups share their hyperparameters: the masked optimizer holds the
    k entries in one packed group.
    """
    while hasattr(optimizer, "optimizer") and isinstance(optimizer.optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer  # Accelerate's AcceleratedOptimizer, Lightning's LightningOptimizer
    if isinstance(optimizer, (MaskedAdamW, MaskedSGD)):
        raise TypeError("the optimizer is already masked; pass the stock torch.optim.AdamW or SGD it replaces")
    cls = MaskedAdamW if isinstance(optimizer, torch.optim.AdamW) else (
        MaskedSGD if isinstance(optimizer, torch.optim.SGD) else None)
    if cls is None:
        raise TypeError(f"a masked counterpart exists for torch.optim.AdamW and torch.optim.SGD, not "
                        f"{type(optimizer).__name__}; build the optimizer as one of those two")
    groups = optimizer.param_groups
    hyper = {name: groups[0][name] for name in _HYPER[cls] if name in groups[0]}
    differ = sorted({n for g in groups[1:] for n in hyper if g[n] != hyper[n]})
    if differ:
        raise ValueError(f"the optimizer's parameter groups differ in {differ}; the masked optimizer trains the "
                         f"mask's entries as one group: use one value of each for all parameters")
    return cls(model, mask, **hyper)


def require_ddp_when_distributed(model: nn.Module, who: str, fix: str) -> bool:
    """True if ``model`` is DDP-wrapped; False in a one-process world; raises in a multi-process
    world where ``who`` left the model unwrapped (its gradients would never be averaged)."""
    if isinstance(model, DistributedDataParallel):
        return True
    if sdist.world_size() > 1:
        raise RuntimeError(f"{who} did not wrap the model in DistributedDataParallel although "
                           f"{sdist.world_size()} processes run: ranks would train apart; {fix}")
    return False


@torch.no_grad()
def adopt_rank0_state(module: nn.Module) -> None:
    """Every rank takes rank 0's parameters and buffers (one broadcast each; nothing in a
    one-process world), as DDP does when it wraps the model. A mask scored before the wrap (a
    FISH mask) then scores the model that trains, not a head each rank initialised its own way."""
    if sdist.world_size() <= 1:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        torch.distributed.broadcast(tensor.data, src=0)


def split_labels(batches: Iterable[Mapping[str, Any]],
                 label_key: str = "labels") -> Iterator[tuple[dict, torch.Tensor]]:
    """Hugging Face batches (dicts holding ``label_key``) as the ``(inputs, targets)`` pairs
    :func:`sparsecomm.fisher_mask` scores: the model then sees the inputs without the labels."""
    for batch in batches:
        if label_key not in batch:
            raise ValueError(f"a training batch has no {label_key!r} entry (keys: {sorted(batch)}); the Fisher mask "
                             f"scores labelled batches: pass a mask instead, or use mask_kind='random'")
        yield {k: v for k, v in batch.items() if k != label_key}, batch[label_key]


def classification_loss(outputs: Any, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of a classifier's logits (``outputs.logits`` or ``outputs``) against ``targets``."""
    return F.cross_entropy(logits_of(outputs).float(), targets)
