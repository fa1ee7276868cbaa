"""The layers engine of :mod:`sparsecomm.fisher`: exact per-example squared gradients from one
batched forward and one backward to the layers' outputs (see ``fisher``'s docstring for what
qualifies a model). Nothing here crosses the network."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap
from torch.utils._pytree import tree_flatten

from .modelio import forward, logits_of


def batch_size_of(inputs: Any) -> int:
    """The batch dimension of ``inputs`` (a tensor or a mapping of them)."""
    leaves, _ = tree_flatten(inputs)
    return int(leaves[0].shape[0])


class Unsupported(Exception):
    """The model does something the layers engine cannot score exactly; use vmap."""


_BN = nn.modules.batchnorm._BatchNorm


def layer_plan(model: nn.Module) -> tuple[dict | None, str]:
    """{module: [(param attribute, full name), ...]} for the layers engine, or (None, why not)."""
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    plan = {}
    for mname, mod in model.named_modules():
        own = [(attr, p) for attr, p in mod.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        kind = type(mod).__name__
        if isinstance(mod, nn.Conv2d):
            if mod.groups != 1 or mod.padding_mode != "zeros" or isinstance(mod.padding, str):
                return None, f"{mname} ({kind}) has groups/padding the layers engine does not unfold"
        elif isinstance(mod, _BN):
            if mod.running_mean is None or mod.running_var is None:
                return None, f"{mname} ({kind}) has no running statistics (batch statistics mix examples)"
        elif isinstance(mod, nn.Embedding):
            if mod.max_norm is not None or mod.scale_grad_by_freq:
                return None, f"{mname} ({kind}) uses max_norm or scale_grad_by_freq"
        elif not isinstance(mod, (nn.Linear, nn.LayerNorm)):
            return None, f"{mname} holds parameters in a {kind}, which the layers engine does not handle"
        for attr, p in own:
            if counts[id(p)] > 1:
                return None, f"{mname}.{attr} is shared between modules"
            if attr not in ("weight", "bias"):
                return None, f"{mname}.{attr} is not a weight or bias"
        plan[mod] = [(attr, f"{mname}.{attr}" if mname else attr) for attr, _ in own]
    return plan, ""


def _per_example_losses(loss_fn: Callable, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """loss_fn on each example alone (a batch of one), as the vmap and loop paths compute it."""
    one = lambda o, t: loss_fn(o.unsqueeze(0), t.unsqueeze(0))  # noqa: E731
    try:
        return vmap(one)(out, y)
    except Exception:  # a loss vmap cannot batch: call it per example (cheap next to the model)
        return torch.stack([loss_fn(out[i:i + 1], y[i:i + 1]) for i in range(out.shape[0])])


def accumulate_layers(scores, plan, x, y, model, loss_fn, method, chunk_size) -> None:
    """Add this batch's summed per-example squared gradients to ``scores`` (all or nothing)."""
    seen: dict[nn.Module, tuple] = {}
    batch = batch_size_of(x)

    def hook(mod, args, out):
        if mod in seen:
            raise Unsupported(f"{type(mod).__name__} runs more than once per forward")
        a = args[0] if args else None
        if not isinstance(a, torch.Tensor) or not isinstance(out, torch.Tensor):
            raise Unsupported(f"{type(mod).__name__} is called with non-tensor input/output")
        if isinstance(mod, nn.Embedding) and a.dim() >= 1 and a.shape[0] != batch:
            if a.shape[0] != 1:
                raise Unsupported(f"an Embedding's ids have batch {a.shape[0]}, not the batch's {batch}")
            a = a.expand(batch, *a.shape[1:])  # shared ids (e.g. positions): the same for every example
            out = out.expand(batch, *out.shape[1:])  # broadcast as the model would; per-example gradients
            seen[mod] = (a, out, a._version, out._version)
            return out
        seen[mod] = (a, out, a._version, out._version)

    handles = [m.register_forward_hook(hook) for m in plan]
    try:
        out = forward(model, x)
    finally:
        for h in handles:
            h.remove()
    logits = logits_of(out)
    if not isinstance(logits, torch.Tensor):
        raise Unsupported("the model's output is not a tensor")
    if method == "empirical":
        targets = [_per_example_losses(loss_fn, out if isinstance(out, torch.Tensor) else logits, y).sum()]
    else:
        if logits.dim() != 2:
            raise Unsupported("expected Fisher needs (batch, classes) logits")
        logp = torch.log_softmax(logits.float(), dim=-1)
        w = logp.detach().exp().sqrt()  # sqrt p(c|x), a constant
        targets = [(w[:, c] * logp[:, c]).sum() for c in range(logp.shape[1])]
    for a, o, va, vo in seen.values():
        if a._version != va or o._version != vo:
            raise Unsupported("a layer's input or output is modified in place (e.g. ReLU(inplace=True))")
        if not o.requires_grad:
            raise Unsupported("a layer runs without autograd (e.g. under torch.no_grad())")
    mods = list(seen)
    outs = [seen[m][1] for m in mods]
    # Every check that can reject the batch ran above, so nothing partial is left behind by adding
    # into the scores directly. One target (empirical): scores += square, as through a zeroed
    # buffer, without a second copy of the scores. Several (expected): summed over the classes in a
    # buffer first, so the sums keep their order (one more float32 copy of the scores per batch).
    add = scores if len(targets) == 1 else {n: torch.zeros_like(scores[n]) for m in mods for _, n in plan[m]}
    for i, t in enumerate(targets):
        grads = torch.autograd.grad(t, outs, retain_graph=i < len(targets) - 1, allow_unused=True)
        with torch.no_grad():
            for m, g in zip(mods, grads):
                if g is not None:
                    a = seen[m][0].detach()
                    _layer_squares(m, plan[m], a if isinstance(m, nn.Embedding) else a.float(), g.float(), add,
                                   chunk_size)
    if add is not scores:
        for n, v in add.items():
            scores[n] += v


def _sum_sq_bmm(left: torch.Tensor, right: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """sum_i (left_i @ right_i)**2 over the batch, chunk_size products at a time, in one reused buffer."""
    B = left.shape[0]
    buf = left.new_empty(min(B, chunk_size), left.shape[1], right.shape[2])
    total = left.new_zeros(left.shape[1], right.shape[2])
    for s in range(0, B, chunk_size):
        out = buf[:min(chunk_size, B - s)]
        torch.bmm(left[s:s + chunk_size], right[s:s + chunk_size], out=out)
        total += out.square_().sum(0)  # in place: no second chunk-sized buffer
    return total


def _layer_squares(mod, names, a, g, add, chunk_size) -> None:
    """add[name] += sum_i (d loss_i / d param)**2 from the layer input a and output gradient g."""
    B = g.shape[0]
    want = dict(names)
    wsq = bsq = None
    if isinstance(mod, nn.Linear):
        if a.dim() == 2:  # grad_i = g_i a_i^T: the square of an outer product is the outer product of squares
            if "weight" in want:
                wsq = g.square().t().mm(a.square())
            if "bias" in want:
                bsq = g.square().sum(0)
        else:  # applied per token: grad_i = sum_t g_it a_it^T, materialised per chunk
            a3, g3 = a.reshape(B, -1, a.shape[-1]), g.reshape(B, -1, g.shape[-1])
            if "weight" in want:
                wsq = _sum_sq_bmm(g3.transpose(1, 2), a3, chunk_size)
            if "bias" in want:
                bsq = g3.sum(1).square().sum(0)
    elif isinstance(mod, nn.Embedding):  # a: (B, ...) int ids; g: (B, ..., dim)
        ids = a.reshape(B, -1).long()
        rows = g.reshape(B, -1, g.shape[-1])
        keep = ids != mod.padding_idx if mod.padding_idx is not None else torch.ones_like(ids, dtype=torch.bool)
        example = torch.arange(B, device=ids.device).unsqueeze(1).expand_as(ids)
        pair = (example * mod.num_embeddings + ids)[keep]  # one key per (example, id) occurrence
        keys, slot = torch.unique(pair, return_inverse=True)
        summed = rows.new_zeros(keys.numel(), rows.shape[-1]).index_add_(0, slot, rows[keep])
        wsq = rows.new_zeros(mod.num_embeddings, rows.shape[-1]).index_add_(
            0, keys % mod.num_embeddings, summed.square())
    elif isinstance(mod, nn.Conv2d):
        g3 = g.reshape(B, g.shape[1], -1)  # (B, out, L)
        if "weight" in want:
            wsq = g3.new_zeros(g3.shape[1], mod.weight[0].numel())
            for s in range(0, B, chunk_size):  # unfold per chunk: (c, in*kh*kw, L) is kh*kw x the input
                cols = F.unfold(a[s:s + chunk_size], mod.kernel_size, mod.dilation, mod.padding, mod.stride)
                wsq += _sum_sq_bmm(g3[s:s + chunk_size], cols.transpose(1, 2), chunk_size)
        if "bias" in want:
            bsq = g3.sum(2).square().sum(0)
    else:  # y = x_hat * weight + bias, elementwise: grad_i = sum over the example's other dims
        if isinstance(mod, _BN):  # eval: x_hat = (x - mean) / sqrt(var + eps), over channel dim 1
            shape = [1, -1] + [1] * (a.dim() - 2)
            xhat = (a - mod.running_mean.float().view(shape)) / (mod.running_var.float().view(shape) + mod.eps).sqrt()
            summed = tuple(range(2, a.dim()))
        else:  # LayerNorm over the last len(normalized_shape) dims
            red = tuple(range(a.dim() - len(mod.normalized_shape), a.dim()))
            mean, var = a.mean(red, keepdim=True), a.var(red, unbiased=False, keepdim=True)
            xhat = (a - mean) / (var + mod.eps).sqrt()
            summed = tuple(range(1, a.dim() - len(red)))
        per_example = (lambda t: t.sum(summed)) if summed else (lambda t: t)  # sum(()) would sum everything
        if "weight" in want:
            wsq = per_example(g * xhat).square().sum(0)
        if "bias" in want:
            bsq = per_example(g).square().sum(0)
    if wsq is not None:
        add[want["weight"]] += wsq.reshape(add[want["weight"]].shape)
    if bsq is not None:
        add[want["bias"]] += bsq.reshape(add[want["bias"]].shape)
