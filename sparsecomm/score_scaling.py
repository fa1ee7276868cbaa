"""Fisher scores with the activation scale taken out: outlier channels stop taking the budget.

The empirical Fisher of a Linear weight ``W[i, j]`` is ``sum_n (g_ni a_nj)^2``: the output
gradient squared times the INPUT activation squared. A few channels of a transformer's residual
stream carry activations tens of times larger than the rest, so a plain top-k of the scores
crowds onto their columns (``benchmarks/results/transfer_mask_placement.md``: 27.8% of FISH's
stream entries on 8 of 384 channels). Three ways to take the scale out, each applied to the
scores of every ``nn.Linear`` weight and every Hugging Face GPT-2 style ``Conv1D`` weight (a
Linear stored transposed, ``(in, out)``); other parameters keep their scores:

* ``"activation"``: divide column ``j`` by the mean squared input activation of channel ``j``
  (measured on the scoring data by :func:`input_activation_scales`). What remains is the
  gradient's share, on the same scale as a bias's score (a bias's gradient is ``g_i``).
* ``"columns"``: divide column ``j`` by its mean score and multiply by the matrix's mean, so
  every input channel has the same total and the matrix its Fisher total (no extra data pass).
* ``"rows_and_columns"``: ``s_ij m^2 / (r_i c_j)`` with ``r``, ``c`` the row and column means
  and ``m`` the matrix mean: a score that is a product ``u_i v_j`` becomes flat (``m``); the
  output side's outliers (attention-output and FFN-out rows write the stream) go too.

Distributed: every divisor is computed from CROSS-RANK sums, so each rank scales its local
scores by the same factors and the sum over ranks of the scaled scores is the scaled sum of the
scores: :func:`sparsecomm.topk.sum_topk` then ranks exactly what one process holding all the
data would rank. Over the network: one float64 all-reduce of ``in_features + 1`` numbers per
Linear (``"activation"``) or of ``out + in`` numbers per Linear (the marginals); 6 kB-25 kB
per MiniLM layer, nothing against the score exchange.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_map

from . import distributed as sdist
from .fisher_layers import batch_size_of
from .mask import _unwrap
from .modelio import forward

NORMALISATIONS = ("none", "activation", "columns", "rows_and_columns")

#: A divisor below this fraction of its mean is raised to it (a dead channel does not blow up).
FLOOR = 1e-6


def linear_weights(model: nn.Module) -> dict[str, nn.Module]:
    """``{weight's parameter name: module}`` of every ``nn.Linear`` and ``Conv1D`` of ``model`` (unwrapped)."""
    model = _unwrap(model)
    return {f"{name}.weight" if name else "weight": m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) or _is_conv1d(m)}


def _is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): ``y = x @ W + b`` with ``W`` of shape ``(in, out)``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def input_axis(module: nn.Module) -> int:
    """The weight's axis that indexes input channels: 1 for ``nn.Linear`` ``(out, in)``, 0 for ``Conv1D``."""
    return 0 if _is_conv1d(module) else 1


def in_features(module: nn.Module) -> int:
    return int(module.weight.shape[input_axis(module)])


def _all_reduce_sum(tensors: list[torch.Tensor], process_group=None) -> None:
    """Sum float64 ``tensors`` across ranks in place (one flat all-reduce; no-op on one rank)."""
    if not (sdist.is_initialized() and sdist.world_size(process_group) > 1) or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=process_group)
    lo = 0
    for t in tensors:
        t.copy_(flat[lo:lo + t.numel()].reshape(t.shape))
        lo += t.numel()


@torch.no_grad()
def input_activation_scales(model: nn.Module, data: Iterable, *, num_samples: int,
                            process_group=None) -> dict[str, torch.Tensor]:
    """Mean squared input activation per input channel of every Linear weight, over all ranks.

    ``data`` yields ``(inputs, targets)`` batches (this rank's share; at most ``num_samples``
    examples are read). Every position of every example counts (a transformer's padding
    positions included). Returns ``{weight name: float64 (in_features,)}``, identical on every
    rank (collective: sums and counts are all-reduced, ``8 x (in + 1)`` bytes per Linear).
    """
    model = _unwrap(model)
    layers = linear_weights(model)
    sums = {n: torch.zeros(in_features(m), dtype=torch.float64, device=m.weight.device) for n, m in layers.items()}
    counts = {n: torch.zeros(1, dtype=torch.float64, device=m.weight.device) for n, m in layers.items()}

    def recorder(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, in_features(module)).to(torch.float64)
            sums[name] += x.pow(2).sum(0)
            counts[name] += x.shape[0]
        return hook

    handles = [m.register_forward_pre_hook(recorder(n)) for n, m in layers.items()]
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for inputs, _ in data:
            take = min(batch_size_of(inputs), num_samples - seen)
            if take <= 0:
                break
            forward(model, tree_map(lambda t: t[:take], inputs))
            seen += take
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    names = list(layers)
    _all_reduce_sum([sums[n] for n in names] + [counts[n] for n in names], process_group)
    return {n: sums[n] / counts[n].clamp_min(1.0) for n in names}


def _floored(divisor: torch.Tensor) -> torch.Tensor:
    """``divisor`` with entries under ``FLOOR x`` its mean raised to that (all positive)."""
    floor = float(divisor.mean()) * FLOOR
    return divisor.clamp_min(floor if floor > 0 else torch.finfo(torch.float64).tiny)


def divide_by_activation(scores: Mapping[str, torch.Tensor], scales: Mapping[str, torch.Tensor],
                         axes: Mapping[str, int] | None = None) -> None:
    """In place: each weight's score along its input channel ``j`` divided by ``scales[name][j]``
    (``scales`` from :func:`input_activation_scales`; ``axes[name]``: the input axis, 1 unless
    given; names not in ``scores`` are skipped)."""
    for name, a2 in scales.items():
        if name in scores:
            s = scores[name]
            shape = (1, -1) if (axes or {}).get(name, 1) == 1 else (-1, 1)
            s.div_(_floored(a2).to(device=s.device, dtype=torch.float64).reshape(shape).to(s.dtype))


def normalise_marginals(scores: Mapping[str, torch.Tensor], names: Iterable[str], *, rows: bool,
                        process_group=None, axes: Mapping[str, int] | None = None) -> None:
    """In place, per 2-D score ``names``: flatten the input-channel totals (the columns of an
    ``(out, in)`` weight; ``axes[name] = 0`` for an ``(in, out)`` one) and, if ``rows``, the
    output-channel totals too.

    Column means ``c_j``, row means ``r_i`` and the matrix mean ``m`` are taken of the scores
    SUMMED over ranks (one float64 all-reduce of ``out + in`` numbers per matrix), so every rank
    multiplies by the same factors: ``m / c_j`` (columns) or ``m^2 / (r_i c_j)`` (both).
    """
    names = [n for n in names if n in scores and scores[n].dim() == 2]
    if not names:
        return
    views = {n: scores[n] if (axes or {}).get(n, 1) == 1 else scores[n].t() for n in names}  # (out, in) views
    row_sums = [views[n].to(torch.float64).sum(1) for n in names]
    col_sums = [views[n].to(torch.float64).sum(0) for n in names]
    _all_reduce_sum(row_sums + col_sums, process_group)
    for n, r, c in zip(names, row_sums, col_sums):
        s = views[n]
        out_f, in_f = s.shape
        m = float(r.sum()) / (out_f * in_f)
        if m <= 0:
            continue  # an all-zero matrix stays zero
        col = _floored(c / out_f)
        factor = (m / col).reshape(1, -1)
        if rows:
            factor = factor * (m / _floored(r / in_f)).reshape(-1, 1)
        s.mul_(factor.to(device=s.device, dtype=s.dtype))


def check_normalisation(how: str, field: str = "normalise") -> str:
    if how not in NORMALISATIONS:
        raise ValueError(f"{field}={how!r} is not a score normalisation; use one of {', '.join(NORMALISATIONS)}")
    return how


def normalise_scores(scores: Mapping[str, torch.Tensor], model: nn.Module, how: str, *,
                     activation_scales: Mapping[str, torch.Tensor] | None = None, process_group=None) -> None:
    """In place: take the activation scale out of the Linear weights' ``scores`` by ``how``
    (:data:`NORMALISATIONS`; the module doc). ``"activation"`` needs ``activation_scales``."""
    check_normalisation(how)
    if how == "activation" and activation_scales is None:
        raise ValueError("normalise='activation' needs the input activation scales (input_activation_scales)")
    axes = {n: input_axis(m) for n, m in linear_weights(model).items()}
    if how == "activation":
        divide_by_activation(scores, activation_scales, axes)
    elif how in ("columns", "rows_and_columns"):
        normalise_marginals(scores, axes, rows=how == "rows_and_columns", process_group=process_group, axes=axes)
