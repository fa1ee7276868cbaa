"""FISH mask: keep the k entries with the largest empirical Fisher information.

Score of an entry = sum over examples of its squared per-example gradient (Sung, Nair, Raffel,
2021), with the model in eval mode (dropout off, BatchNorm using running statistics). Two exact
engines compute it:

- ``"layers"``: one batched forward and one backward to the layers' OUTPUTS (no weight
  gradients), then each layer's per-example weight gradient from its input ``a_i`` and output
  gradient ``g_i``: a Linear applied once per example has ``grad_i = g_i a_i^T``, so
  ``sum_i grad_i**2 = (g**2)^T (a**2)``, one matmul, nothing per example materialised; a Linear
  over a sequence and a Conv2d (``unfold``) materialise ``grad_i = sum_t g_it a_it^T`` per chunk
  of examples with one ``bmm``; BatchNorm (eval) and LayerNorm from ``g * x_hat``; an Embedding
  from its ids: example i's gradient row of token id t is the sum of ``g_i`` over the positions
  of example i holding t (none at ``padding_idx``), summed per distinct (example, id) pair with
  one ``index_add``, nothing vocabulary-sized per example (an Embedding called with a batch of
  one, e.g. BERT's position ids (1, L), is broadcast over the batch, so its output is expanded to
  the batch for the backward). Used when every module holding a trainable parameter is a Linear,
  Conv2d (groups 1, zero padding), BatchNorm (running statistics), LayerNorm or Embedding (no
  ``max_norm``, no ``scale_grad_by_freq``), no parameter is shared, each such module runs once per
  forward and nothing it read or wrote is changed in place; the model must treat the examples
  of a batch independently in eval mode (true of models built from these layers).
- ``"vmap"``: ``torch.func`` ``vmap`` over ``grad`` of a functional call, in chunks: any model,
  but it materialises every per-example gradient, and on CPU a convolution's per-example weight
  gradient runs as a grouped convolution, so it is barely faster than a batch-size-1 loop.

``engine="auto"`` (default) uses ``"layers"`` when the model qualifies, else ``"vmap"``.

Distributed: each rank scores its own share of ``num_samples`` from its own ``data``; the mask
is the top k of the per-entry scores summed across ranks in float64, ties broken by position.
By default only candidates travel (:func:`sparsecomm.topk.sum_topk`: each rank's local top 2k
positions, then the float64 sums at their union, with a certificate that nothing outside the
union can enter the top k; the full exchange when it fails), a few MB instead of n x 8 bytes;
``exchange="full"`` sums every score, one bounded chunk at a time. The digests are then
compared across ranks before the mask is returned.

Memory: the scores are parameter-shaped float32 tensors on the model's device (1x the model's
fp32 size); the top-k streams over them (one float64 chunk + O(k), :mod:`sparsecomm.topk`); the
mask's bits take n bytes (0.25x) on the CPU. The layers engine adds one layer's weight-sized
product at a time (and, for ``method="expected"`` only, one more float32 copy of the scores per
batch); the vmap engine materialises ``chunk_size`` per-example gradients (chunk_size x the model).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map

from . import distributed as sdist
from .fisher_layers import Unsupported, accumulate_layers, batch_size_of, layer_plan
from .mask import Mask, _assemble, _unwrap, count_for_density, select_topk
from .modelio import forward, logits_of
from .topk import DEFAULT_CHUNK_NUMEL, sum_topk

METHODS = ("empirical", "expected")
EXCHANGES = ("candidates", "full")
ENGINES = ("auto", "layers", "vmap")


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
        logp = torch.log_softmax(logits_of(out).reshape(-1), dim=0)
        return weight * (logp * onehot).sum()  # one-hot, not logp[c]: vmap cannot index by a tensor
    return nll_class


def fisher_scores(model: nn.Module, data: Iterable, loss_fn: Callable, *, num_samples: int,
                  method: str = "empirical", chunk_size: int = 32, vectorized: bool = True,
                  engine: str = "auto", stats: dict | None = None) -> tuple[dict, int]:
    """Local (this rank's) Fisher scores of the trainable parameters and the number of examples used.

    ``data`` yields ``(inputs, targets)`` batches (inputs: a tensor or a dict of tensors with a
    leading batch dimension); at most ``num_samples`` examples are used. Returns float32 scores
    shaped like each parameter. ``engine``: ``"auto"``, ``"layers"`` or ``"vmap"`` (module
    docstring); ``chunk_size`` bounds the examples whose per-example gradients are materialised
    at once. ``vectorized=False`` runs the reference batch-size-1 loop with plain autograd (slow;
    for comparison). ``stats``, if given, receives ``engine`` (the one that ran) and, when
    ``"auto"`` fell back to vmap, ``fallback_reason``.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not a Fisher method; use one of {METHODS}")
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r} is not a Fisher engine; use one of {ENGINES}")
    model = _unwrap(model)
    stats = {} if stats is None else stats
    plan = None
    if vectorized and engine != "vmap":
        plan, reason = layer_plan(model)
        if plan is None:
            if engine == "layers":
                raise ValueError(f"engine='layers' cannot score this model: {reason}; use engine='vmap'")
            stats["fallback_reason"] = reason
    stats["engine"] = ("layers" if plan is not None else "vmap") if vectorized else "loop"
    was_training = model.training
    model.eval()
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    scores = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    per_example = _example_losses(model, loss_fn, method)
    seen = 0
    try:
        for inputs, targets in data:
            take = min(batch_size_of(inputs), num_samples - seen)
            if take <= 0:
                break
            x = tree_map(lambda t: t[:take], inputs)
            y = targets[:take]
            if plan is not None:
                try:
                    accumulate_layers(scores, plan, x, y, model, loss_fn, method, chunk_size)
                except Unsupported as e:  # found out only while running: no partial sums were added
                    if engine == "layers":
                        raise ValueError(f"engine='layers' cannot score this model: {e}; use engine='vmap'") from None
                    plan = None
                    stats.update(engine="vmap", fallback_reason=str(e))
            if plan is None and vectorized:
                with warnings.catch_warnings():  # functorch's note that an op (e.g. CPU flash attention)
                    # has no batching rule and is looped over: correct, only slower; not the user's to fix
                    warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet")
                    _accumulate_vmap(scores, per_example, params, buffers, x, y, model, method, chunk_size)
            elif not vectorized:
                _accumulate_loop(scores, loss_fn, x, y, model, method)
            seen += take
    finally:
        model.train(was_training)
    return scores, seen


def _class_weights(model, params, buffers, x) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(logits_of(_call(model, params, buffers, x)).float(), dim=-1).sqrt()


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


# ---------------------------------------------------------------------------- the "layers" engine

def _accumulate_loop(scores, loss_fn, x, y, model, method) -> None:
    """The reference: one example at a time with plain autograd (the paper's code path)."""
    named = dict(model.named_parameters())
    for i in range(batch_size_of(x)):
        xi = tree_map(lambda t: t[i:i + 1], x)
        out = forward(model, xi)
        if method == "empirical":
            terms = [loss_fn(out, y[i:i + 1])]
        else:
            logp = torch.log_softmax(logits_of(out).reshape(-1), dim=0)
            p = logp.detach().exp()
            terms = [p[c].sqrt() * logp[c] for c in range(logp.numel())]
        for term in terms:
            gs = torch.autograd.grad(term, [named[n] for n in scores], retain_graph=True)
            for n, gi in zip(scores, gs):
                scores[n] += gi.float().pow(2)


def fisher_mask(model: nn.Module, data: Iterable, loss_fn: Callable, *, density: float, num_samples: int = 1024,
                method: str = "empirical", always: Iterable[str] = (), process_group=None,
                chunk_size: int = 32, engine: str = "auto", score_chunk_numel: int = DEFAULT_CHUNK_NUMEL,
                exchange: str = "candidates", stats: dict | None = None,
                transform: Callable[[dict[str, torch.Tensor]], None] | None = None) -> Mask:
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
        chunk_size, engine: how per-example gradients are computed (``fisher_scores``); exact either way.
        score_chunk_numel: entries per float64 chunk of the cross-rank sum and the top-k.
        exchange: ``"candidates"`` (default) ranks the cross-rank sums with the exact candidate
            protocol of :func:`sparsecomm.topk.sum_topk` (the same mask as ``"full"``, a few
            MB instead of n x 8 bytes; it falls back to the full exchange when its certificate
            fails); ``"full"`` all-reduces every ranked score.
        stats: optional dict; receives :func:`~sparsecomm.topk.sum_topk`'s ``exchange``,
            ``rounds``, ``candidates``, ``bytes_sent`` and ``full_bytes`` (per rank).
        transform: optional ``transform(scores)`` that rewrites this rank's local scores (name ->
            float32 tensor) in place before they are summed and ranked, e.g. the activation
            normalisation of :mod:`sparsecomm.score_scaling`. It must be linear in the scores
            with the same factors on every rank (then the ranked sum is the transformed sum),
            keep them >= 0, and may itself be collective (every rank calls it once).

    Over the network (per rank, W ranks, ring collectives): with ``exchange="candidates"``, per
    round an all-gather of ``W x 2k`` int32 candidate positions and an all-reduce of the float64
    scores at their union (at most ``2 W k`` entries): for all-MiniLM-L6-v2 at 0.5% on 2 ranks
    about 4 MB instead of 181 MB; with ``"full"`` (or after a failed certificate) the ranked
    scores (not those matching ``always``) summed in float64 by all-reduces of at most
    ``score_chunk_numel`` entries each (n x 8 bytes in all). Then one all-gather of the digests.

    Memory beyond the model: the float32 scores (parameter-shaped, on the model's device: 1x the
    model's fp32 size), one float64 chunk of ``score_chunk_numel`` entries (8 MiB by default)
    and at most ~100 bytes per selected entry while ranking, the mask's bits (1 byte per entry, CPU), and
    the engine's working memory (see the module doc).
    """
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange={exchange!r} is not a score exchange; use one of {EXCHANGES}")
    model = _unwrap(model)
    all_params = dict(model.named_parameters())
    k = count_for_density(density, sum(p.numel() for p in all_params.values()))
    world, rank = sdist.world_size(process_group), sdist.rank(process_group)
    share = num_samples // world + (1 if rank < num_samples % world else 0)
    scores, seen = fisher_scores(model, data, loss_fn, num_samples=share, method=method, chunk_size=chunk_size,
                                 engine=engine)
    if transform is not None:
        transform(scores)
    if seen < share:
        warnings.warn(
            f"fisher_mask: rank {rank}'s data held {seen} examples, fewer than its share {share} of "
            f"num_samples={num_samples}; scoring with {seen}", stacklevel=2)
    trainable = sum(s.numel() for s in scores.values())
    if k > trainable:
        raise ValueError(f"density={density} asks for k={k} entries but only {trainable} are trainable; "
                         f"lower the density")

    def cross_rank_sum(chunk: torch.Tensor) -> None:  # float64, as the scores were always summed
        dist.all_reduce(chunk, op=dist.ReduceOp.SUM, group=process_group)

    def candidates(tensors: list[torch.Tensor], k_ranked: int) -> torch.Tensor:
        return sum_topk(tensors, k_ranked, process_group=process_group, chunk_numel=score_chunk_numel,
                        stats=stats)

    distributed = sdist.is_initialized() and sdist.world_size(process_group) > 1
    selected = select_topk(scores, k, always, reduce=cross_rank_sum if sdist.is_initialized() else None,
                           chunk_numel=score_chunk_numel,
                           ranker=candidates if distributed and exchange == "candidates" else None)
    del scores  # freed before the bits (n bytes) are built: the peak is the scores or the bits, not both
    mask = _assemble(*selected)
    bits = {n: mask[n] if n in mask else torch.zeros(p.shape, dtype=torch.bool) for n, p in all_params.items()}
    mask = Mask(bits)
    mask.assert_same_on_all_ranks(process_group)
    return mask
