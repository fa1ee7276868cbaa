"""FISH mask: keep the k entries with the largest empirical Fisher information.

Score of an entry = sum over examples of its squared per-example gradient (Sung, Nair, Raffel,
2021). Per-example gradients come from ``torch.func`` (``vmap`` over ``grad`` of a functional
call), in chunks, with the model in eval mode (dropout off, BatchNorm using running statistics:
``vmap`` cannot batch BatchNorm's training-mode statistics).

Distributed: each rank scores its own share of ``num_samples`` from its own ``data``; the
per-entry scores are summed with ONE all-reduce (n x 8 bytes, float64), so every rank ranks
identical numbers; the top-k breaks ties by position; the digests are then compared across ranks
before the mask is returned.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_map

from . import distributed as sdist
from .mask import Mask, _unwrap, count_for_density, topk_mask

METHODS = ("empirical", "expected")


def _logits(outputs: Any) -> torch.Tensor:
    return outputs.logits if hasattr(outputs, "logits") else outputs


def _batch_size(inputs: Any) -> int:
    leaves, _ = tree_flatten(inputs)
    return int(leaves[0].shape[0])


def _call(model: nn.Module, params, buffers, inputs: Any):
    if isinstance(inputs, Mapping):
        return functional_call(model, (params, buffers), args=(), kwargs=dict(inputs))
    return functional_call(model, (params, buffers), (inputs,))


def _example_losses(model: nn.Module, loss_fn: Callable, method: str):
    """A function (params, buffers, x, y) -> per-example loss whose grad squared is the score term."""
    unsqueeze = lambda t: t.unsqueeze(0)  # noqa: E731

    if method == "empirical":
        def loss_one(params, buffers, x, y):
            out = _call(model, params, buffers, tree_map(unsqueeze, x))
            return loss_fn(out, y.unsqueeze(0))
        return loss_one

    # expected Fisher: sum_c p(c|x) (d log p(c|x))^2 = sum_c (d [sqrt(p_c) log p(c|x)])^2 with
    # p_c treated as a constant: one grad per class, weighted by the model's own probability.
    def nll_class(params, buffers, x, onehot, weight):
        out = _call(model, params, buffers, tree_map(unsqueeze, x))
        logp = torch.log_softmax(_logits(out).reshape(-1), dim=0)
        return weight * (logp * onehot).sum()  # one-hot, not logp[c]: vmap cannot index by a tensor
    return nll_class


def fisher_scores(model: nn.Module, data: Iterable, loss_fn: Callable, *, num_samples: int,
                  method: str = "empirical", chunk_size: int = 32, vectorized: bool = True) -> tuple[dict, int]:
    """Local (this rank's) Fisher scores of the trainable parameters and the number of examples used.

    ``data`` yields ``(inputs, targets)`` batches (inputs: a tensor or a dict of tensors with a
    leading batch dimension); at most ``num_samples`` examples are used. Returns float32 scores
    shaped like each parameter. ``vectorized=False`` runs the reference batch-size-1 loop with
    plain autograd (slow; for comparison).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not a Fisher method; use one of {METHODS}")
    model = _unwrap(model)
    was_training = model.training
    model.eval()
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    scores = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    per_example = _example_losses(model, loss_fn, method)
    seen = 0
    try:
        for inputs, targets in data:
            take = min(_batch_size(inputs), num_samples - seen)
            if take <= 0:
                break
            x = tree_map(lambda t: t[:take], inputs)
            y = targets[:take]
            if vectorized:
                _accumulate_vmap(scores, per_example, params, buffers, x, y, model, method, chunk_size)
            else:
                _accumulate_loop(scores, loss_fn, x, y, model, method)
            seen += take
    finally:
        model.train(was_training)
    return scores, seen


def _class_weights(model, params, buffers, x) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(_logits(_call(model, params, buffers, x)).float(), dim=-1).sqrt()


def _accumulate_vmap(scores, per_example, params, buffers, x, y, model, method, chunk_size) -> None:
    if method == "empirical":
        g = vmap(grad(per_example), in_dims=(None, None, 0, 0), chunk_size=chunk_size)(params, buffers, x, y)
        for n in scores:
            scores[n] += g[n].float().pow(2).sum(0)
        return
    weights = _class_weights(model, params, buffers, x)  # (B, C): sqrt p(c|x)
    classes = torch.eye(weights.shape[1], dtype=weights.dtype)
    per_class = vmap(grad(per_example), in_dims=(None, None, None, 0, 0))  # over classes
    g = vmap(per_class, in_dims=(None, None, 0, None, 0), chunk_size=max(1, chunk_size // len(classes)))(
        params, buffers, x, classes, weights)
    for n in scores:
        scores[n] += g[n].float().pow(2).sum((0, 1))


def _accumulate_loop(scores, loss_fn, x, y, model, method) -> None:
    """The reference: one example at a time with plain autograd (the paper's code path)."""
    named = dict(model.named_parameters())
    for i in range(_batch_size(x)):
        xi = tree_map(lambda t: t[i:i + 1], x)
        out = model(**xi) if isinstance(xi, Mapping) else model(xi)
        if method == "empirical":
            terms = [loss_fn(out, y[i:i + 1])]
        else:
            logp = torch.log_softmax(_logits(out).reshape(-1), dim=0)
            p = logp.detach().exp()
            terms = [p[c].sqrt() * logp[c] for c in range(logp.numel())]
        for term in terms:
            gs = torch.autograd.grad(term, [named[n] for n in scores], retain_graph=True)
            for n, gi in zip(scores, gs):
                scores[n] += gi.float().pow(2)


def fisher_mask(model: nn.Module, data: Iterable, loss_fn: Callable, *, density: float, num_samples: int = 1024,
                method: str = "empirical", always: Iterable[str] = (), process_group=None,
                chunk_size: int = 32) -> Mask:
    """The FISH mask: global top-k of summed squared per-example gradients, identical on all ranks.

    Args:
        model: the (unwrapped or DDP) model; scored in eval mode, restored afterwards.
        data: this rank's iterable of ``(inputs, targets)`` batches (its own shard).
        loss_fn: ``loss_fn(outputs, targets) -> mean loss`` (used by ``method="empirical"``).
        density: fraction in (0, 1]; k = round(density x all entries of the model).
        num_samples: examples scored in total over all ranks (each scores its share).
        method: ``"empirical"`` (true labels) or ``"expected"`` (every class, weighted by p(c|x)).
        always: glob patterns of parameter names kept whole (e.g. the classifier head); they
            count toward k.
        process_group: the group to sum scores over (collective on every rank of it).

    Over the network: one all-reduce of n float64 scores, one all-gather of the digests.
    """
    model = _unwrap(model)
    all_params = dict(model.named_parameters())
    k = count_for_density(density, sum(p.numel() for p in all_params.values()))
    world, rank = sdist.world_size(process_group), sdist.rank(process_group)
    share = num_samples // world + (1 if rank < num_samples % world else 0)
    scores, seen = fisher_scores(model, data, loss_fn, num_samples=share, method=method, chunk_size=chunk_size)
    if seen < share:
        warnings.warn(
            f"fisher_mask: rank {rank}'s data held {seen} examples, fewer than its share {share} of "
            f"num_samples={num_samples}; scoring with {seen}", stacklevel=2)
    if sdist.is_initialized():
        flat = torch.cat([s.reshape(-1).double() for s in scores.values()])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=process_group)
        offset = 0
        for n, s in scores.items():
            scores[n] = flat[offset:offset + s.numel()].reshape(s.shape)
            offset += s.numel()
    trainable = sum(s.numel() for s in scores.values())
    if k > trainable:
        raise ValueError(f"density={density} asks for k={k} entries but only {trainable} are trainable; "
                         f"lower the density")
    mask = topk_mask(scores, k, always)
    bits = {n: mask[n] if n in scores else torch.zeros(p.shape, dtype=torch.bool) for n, p in all_params.items()}
    mask = Mask(bits)
    mask.assert_same_on_all_ranks(process_group)
    return mask
