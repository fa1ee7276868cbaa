"""Independent references the tests compare the library with: the slow, obvious computation,
written here without any of the library's code (no vmap, no per-layer formulas, no packing)."""
from __future__ import annotations

from collections.abc import Mapping

import torch


def _example(inputs, i: int):
    if isinstance(inputs, Mapping):
        return {k: v[i:i + 1] for k, v in inputs.items()}
    return inputs[i:i + 1]


def reference_fisher(model: torch.nn.Module, batches, loss_fn) -> dict[str, torch.Tensor]:
    """Empirical Fisher scores the slow, obvious way: for every example alone, plain autograd,
    ``score[p] += grad(loss(example))[p] ** 2`` over EVERY trainable parameter, in float64.

    Independent of the library's engines (no vmap, no per-layer formulas). The model runs in
    eval mode (as the library scores) and is left in the mode it was in. Keyword inputs (a
    dict of tensors, HF style) are sliced per example.
    """
    was_training = model.training
    model.eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out = {n: torch.zeros(p.shape, dtype=torch.float64, device=p.device) for n, p in params.items()}
    try:
        for inputs, targets in batches:
            for i in range(len(targets)):
                x = _example(inputs, i)
                logits = model(**x) if isinstance(x, Mapping) else model(x)
                grads = torch.autograd.grad(loss_fn(logits, targets[i:i + 1]), list(params.values()),
                                            allow_unused=True)
                for (n, _), g in zip(params.items(), grads):
                    if g is not None:
                        out[n] += g.double() ** 2
    finally:
        model.train(was_training)
    return {n: s.float() for n, s in out.items()}
