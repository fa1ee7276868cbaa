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


def assert_scores_match(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rtol: float = 1e-3,
                        floor: float = 1e-6) -> None:
    """Same parameters; per parameter ``|got - want| <= rtol x max|want[p]| + floor x max over all
    of want``. The floor is for entries that are 0 in exact arithmetic and tiny float noise in
    both (an attention key's bias: softmax ignores a shift shared by every key)."""
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    top = max(float(w.abs().max()) for w in want.values() if w.numel())
    assert top > 0, "the reference scores are all zero: the test checks nothing"
    for name, w in want.items():
        err = float((got[name].double() - w.double()).abs().max()) if w.numel() else 0.0
        bound = rtol * float(w.abs().max()) + floor * top if w.numel() else 0.0
        assert err <= bound, f"{name}: max |got - want| = {err:.3g} > {bound:.3g}"
