"""Diff pruning (Guo, Rush & Kim, ACL 2021): learn a sparse task diff on top of frozen weights.

The fine-tuned weights are ``theta = theta_base + z * w``: ``theta_base`` frozen, ``w`` a dense
diff vector (initialised to 0) and ``z`` a hard-concrete gate per entry (Louizos, Welling &
Kingma, ICLR 2018) whose expected L0 norm is added to the loss. Afterwards the diff is
projected to an exact density by one global magnitude threshold (:func:`project`) and the
model is fine-tuned with that mask fixed, through the masked all-reduce and masked optimizer.

Hard-concrete gate, per entry (``l < 0 < 1 < r`` the stretch interval, ``beta`` the temperature)::

    u ~ U(0, 1)
    s = sigmoid((log u - log(1 - u) + log_alpha) / beta)
    z = min(1, max(0, s * (r - l) + l))
    P(z != 0) = sigmoid(log_alpha - beta * log(-l / r))          (the expected-L0 term)

Defaults are the diff-pruning paper's: ``l, r = -1.5, 1.5``, ``log_alpha`` initialised to 5
(``P(z != 0) = 0.993`` at the start), and temperature 1: the paper's gate
``sigmoid(log u - log(1-u) + alpha)`` has no temperature, and its penalty
``sigmoid(alpha - log(-l/r))`` is the formula above with ``beta = 1``. Louizos et al. used
``beta = 2/3`` with ``(l, r) = (-0.1, 1.1)``; both are settings here.

Structured variant (``structured=True``): one extra gate ``z_g`` per parameter tensor, so
``theta = theta_base + z * z_g * w`` and the expected L0 norm of tensor ``g`` is
``sum_i P(z_i != 0) * P(z_g != 0)`` (the paper's eq. for groups, each tensor a group).

Parameters whose names match ``ungated`` (e.g. a freshly initialised classifier head) get a
plain dense diff ``theta = theta_base + w`` with no gate and no penalty, as in the reference
implementation; :func:`project` keeps them whole with ``always=``.

What travels, and what it costs (count it: the comparison with FISH must be honest)
-------------------------------------------------------------------------------------
* L0 phase (training :class:`DiffPruning` under DDP): DENSE. Every step all-reduces the
  gradients of every ``w`` entry AND every ``log_alpha`` entry (plus one per tensor when
  structured): ``comm_numel = 2n (+ #tensors)`` values, i.e. about **twice the bytes of dense
  fine-tuning** (``n x 4`` bytes) per step, before the ring factor ``2 (N-1)/N``. The frozen base
  never travels (no gradient; DDP broadcasts it once at construction, like any parameter).
  Register the masked all-reduce hook on the DDP-wrapped :class:`DiffPruning` with
  ``Mask.full(wrapper)`` and ``state.dense = True`` to have ``state.bytes_sent`` count exactly
  this (``comm_numel x 4`` per step, see ``tests/test_diff_pruning.py``).
* Fixed-mask phase (after :func:`project`, on the plain model returned by
  :meth:`DiffPruning.materialize`): ``k`` values per step, as FISH.
* Stored task (``sparsecomm.diff.save``): ``k`` int64 indices + ``k`` values.

Why ``torch.func.functional_call`` and not parametrizations: the wrapper's only trainable
parameters are ``w`` and ``log_alpha``, so DDP buckets, optimizers and the byte count see
exactly what the L0 phase trains; the wrapped model keeps its own parameter names, modules and
buffers (BatchNorm statistics update as usual); and nothing is registered on the user's
modules, so :meth:`DiffPruning.materialize` hands back an ordinary model (same class, same
names) for the fixed-mask phase, the hook and ``sparsecomm.diff.save``. Parametrizations would
rename every parameter (``parametrizations.weight.original``) and put the frozen base among the
trainable-looking parameters of the model the rest of the library handles.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from torch.func import functional_call

from .mask import Mask, _unwrap, count_for_density, matches_any, topk_mask

STRETCH = (-1.5, 1.5)   # (l, r) of the diff-pruning paper
LOG_ALPHA_INIT = 5.0    # the paper's initial log_alpha: gates start almost surely open
TEMPERATURE = 1.0       # the paper's gate has no temperature (Louizos et al. used 2/3)


def _check_gate_args(l: float, r: float, temperature: float) -> None:
    if not (l < 0.0 and r > 1.0):
        raise ValueError(f"hard-concrete stretch (l, r)=({l}, {r}) needs l < 0 and r > 1, e.g. (-1.5, 1.5)")
    if not temperature > 0.0:
        raise ValueError(f"hard-concrete temperature={temperature} must be > 0, e.g. 1.0 (or 2/3)")


def sample_gates(log_alpha: torch.Tensor, *, l: float = STRETCH[0], r: float = STRETCH[1],
                 temperature: float = TEMPERATURE, generator: torch.Generator | None = None) -> torch.Tensor:
    """One hard-concrete sample per entry of ``log_alpha``, in [0, 1], differentiable in ``log_alpha``.

    ``u`` is clamped to [1e-6, 1 - 1e-6] so ``log u`` stays finite; gradients are zero where the
    sample is clipped to exactly 0 or 1 (the hard-sigmoid), as in the reference implementation.
    """
    _check_gate_args(l, r, temperature)
    u = torch.rand(log_alpha.shape, generator=generator, dtype=log_alpha.dtype,
                   device=log_alpha.device).clamp_(1e-6, 1.0 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / temperature)
    return (s * (r - l) + l).clamp(0.0, 1.0)


def deterministic_gates(log_alpha: torch.Tensor, *, l: float = STRETCH[0], r: float = STRETCH[1],
                        temperature: float = TEMPERATURE) -> torch.Tensor:
    """The gate at ``u = 1/2`` (its median): ``min(1, max(0, sigmoid(log_alpha / beta) (r - l) + l))``.

    With ``beta = 1`` this is Louizos et al.'s test-time estimator. Used for evaluation and for
    the diff that :func:`project` thresholds. A gate is exactly 0 iff ``log_alpha <= beta *
    logit(-l / (r - l))`` (``log_alpha <= 0`` for a symmetric stretch).
    """
    _check_gate_args(l, r, temperature)
    return (torch.sigmoid(log_alpha / temperature) * (r - l) + l).clamp(0.0, 1.0)


def prob_nonzero(log_alpha: torch.Tensor, *, l: float = STRETCH[0], r: float = STRETCH[1],
                 temperature: float = TEMPERATURE) -> torch.Tensor:
    """``P(z != 0) = sigmoid(log_alpha - beta * log(-l / r))`` per entry (differentiable)."""
    _check_gate_args(l, r, temperature)
    return torch.sigmoid(log_alpha - temperature * math.log(-l / r))


def expected_l0(log_alpha: torch.Tensor, *, l: float = STRETCH[0], r: float = STRETCH[1],
                temperature: float = TEMPERATURE) -> torch.Tensor:
    """Expected number of non-zero gates: ``sum sigmoid(log_alpha - beta * log(-l / r))`` (a scalar)."""
    return prob_nonzero(log_alpha, l=l, r=r, temperature=temperature).sum()


class DiffPruning(nn.Module):
    """``model``'s forward with weights ``base + z * w`` (``z * z_g * w`` when structured).

    ``model`` becomes the frozen base: its parameters are set ``requires_grad=False`` in place
    (nothing is copied; pass a copy to keep a trainable original). Only the parameters that
    required grad get a diff. The wrapper's trainable parameters are ``diff.i`` (``w``),
    ``log_alpha.j`` and, when structured, ``group_log_alpha``; ``names[i]`` is the base
    parameter ``diff.i`` belongs to.

    In ``train()`` mode every forward draws fresh gates (one per entry per forward, as in the
    paper); in ``eval()`` mode it uses :func:`deterministic_gates`. The base's buffers are its
    own: BatchNorm running statistics update in place in ``train()`` mode, so keep a
    ``copy.deepcopy(model)`` made BEFORE wrapping as the pristine base for ``sparsecomm.diff``
    (changed buffers are then stored whole in the task diff).

    Typical use::

        dp = DiffPruning(task.model, ungated=task.head)
        loss = task.loss_fn(dp(x), y) + l0_penalty * dp.expected_l0()
        ...
        mask = dp.project(density=0.005, always=task.head)
        model = dp.materialize(mask)      # plain model = base + masked diff; fine-tune with mask
    """

    def __init__(self, model: nn.Module, *, structured: bool = False, stretch: tuple[float, float] = STRETCH,
                 log_alpha_init: float = LOG_ALPHA_INIT, temperature: float = TEMPERATURE,
                 ungated: Iterable[str] = ()):
        super().__init__()
        l, r = (float(v) for v in stretch)
        _check_gate_args(l, r, float(temperature))
        self.l, self.r, self.temperature = l, r, float(temperature)
        self.structured = bool(structured)
        self.ungated_patterns = tuple(ungated or ())
        self.base = _unwrap(model)
        params = [(n, p) for n, p in self.base.named_parameters() if p.requires_grad]
        if not params:
            raise ValueError("DiffPruning: the model has no trainable parameter to learn a diff for")
        self.names = [n for n, _ in params]
        self.gated = [n for n in self.names if not matches_any(n, self.ungated_patterns)]
        self._gate_index = {n: j for j, n in enumerate(self.gated)}
        for _, p in params:
            p.requires_grad_(False)
        self.diff = nn.ParameterList([nn.Parameter(torch.zeros_like(p)) for _, p in params])
        self.log_alpha = nn.ParameterList(
            [nn.Parameter(torch.full_like(p, float(log_alpha_init))) for n, p in params if n in self._gate_index])
        if self.structured and self.gated:
            ref = self.log_alpha[0]
            self.group_log_alpha = nn.Parameter(
                torch.full((len(self.gated),), float(log_alpha_init), dtype=ref.dtype, device=ref.device))
        else:
            self.group_log_alpha = None

    # --- gates ----------------------------------------------------------------------------------
    def _gate_kw(self) -> dict:
        return dict(l=self.l, r=self.r, temperature=self.temperature)

    def gates(self, sample: bool | None = None) -> dict[str, torch.Tensor]:
        """Gate tensor per gated parameter name (``z * z_g`` when structured).

        ``sample=None`` follows the mode: sampled in ``train()``, deterministic in ``eval()``.
        """
        sample = self.training if sample is None else sample
        draw = sample_gates if sample else deterministic_gates
        groups = draw(self.group_log_alpha, **self._gate_kw()) if self.group_log_alpha is not None else None
        out = {}
        for n, j in self._gate_index.items():
            z = draw(self.log_alpha[j], **self._gate_kw())
            out[n] = z * groups[j] if groups is not None else z
        return out

    def expected_l0(self) -> torch.Tensor:
        """Expected number of non-zero gated diff entries (add ``lambda x`` this to the loss).

        Unstructured: ``sum_i sigmoid(log_alpha_i - beta log(-l/r))``. Structured: per tensor g,
        ``P(z_g != 0) x sum_{i in g} P(z_i != 0)``. Ungated parameters are not counted.
        """
        kw = self._gate_kw()
        per_tensor = torch.stack([prob_nonzero(la, **kw).sum() for la in self.log_alpha]) if len(self.log_alpha) \
            else torch.zeros(0, device=self.diff[0].device, dtype=self.diff[0].dtype)
        if self.group_log_alpha is not None:
            per_tensor = per_tensor * prob_nonzero(self.group_log_alpha, **kw)
        return per_tensor.sum()

    # --- the forward ----------------------------------------------------------------------------
    def effective_params(self, sample: bool | None = None) -> dict[str, torch.Tensor]:
        """``{name: base + z * w}`` for every diffed parameter (differentiable in ``w``, ``log_alpha``)."""
        base = dict(self.base.named_parameters())
        z = self.gates(sample)
        return {n: base[n] + (z[n] * w if n in z else w) for n, w in zip(self.names, self.diff)}

    def forward(self, *args, **kwargs):
        return functional_call(self.base, self.effective_params(), args, kwargs)

    # --- after the L0 phase ---------------------------------------------------------------------
    @torch.no_grad()
    def diff_vector(self) -> dict[str, torch.Tensor]:
        """The learned diff with deterministic gates, ``{name: z_det * w}`` (detached)."""
        z = self.gates(sample=False)
        return {n: (z[n] * w if n in z else w).detach().clone() for n, w in zip(self.names, self.diff)}

    def project(self, density: float, always: Iterable[str] = (), field: str = "mask.density") -> Mask:
        """:func:`project` of :meth:`diff_vector`, as a mask over ALL base parameters."""
        return project(self.diff_vector(), density, always=always, model=self.base, field=field)

    @torch.no_grad()
    def materialize(self, mask: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
        """A new plain model (deep copy of the base, same class and names): ``base + mask * diff``.

        Entries outside ``mask`` are the base's bits exactly (``torch.where``), so the result
        can be fine-tuned with ``MaskedAdamW(model, mask)`` and saved with
        ``sparsecomm.diff.save(model, base, mask)``. ``mask=None``: the whole diff. The
        copy's diffed parameters have ``requires_grad=True``; the base is left untouched.
        """
        model = copy.deepcopy(self.base)
        diffs = self.diff_vector()
        params = dict(model.named_parameters())
        for n, d in diffs.items():
            p = params[n]
            new = p + d
            if mask is not None:
                new = torch.where(mask[n].to(p.device), new, p)
            p.copy_(new)
            p.requires_grad_(True)
        return model

    # --- accounting -----------------------------------------------------------------------------
    @property
    def numel(self) -> int:
        """n: entries that carry a diff."""
        return sum(w.numel() for w in self.diff)

    @property
    def comm_numel(self) -> int:
        """Gradient entries DDP all-reduces per L0-phase step: ``w`` + ``log_alpha`` (+ group gates)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def comm_bytes_per_step(self, wire_bytes: int = 4) -> int:
        """Payload bytes one rank hands to all-reduce per L0-phase step (before the ring factor)."""
        return self.comm_numel * int(wire_bytes)

    @torch.no_grad()
    def nonzero_fraction(self) -> float:
        """Fraction of diffed entries whose deterministic gated diff is non-zero."""
        nz = sum(int((d != 0).sum()) for d in self.diff_vector().values())
        return nz / max(self.numel, 1)


def project(diff: Mapping[str, torch.Tensor], density: float, *, always: Iterable[str] = (),
            model: nn.Module | None = None, field: str = "mask.density") -> Mask:
    """Mask of the ``k = round(density x n)`` largest ``|diff|`` entries: ONE global threshold.

    ``n`` counts the entries of ``diff``. Exactly ``k`` entries are selected; entries equal to
    the threshold are taken in order of position (``diff``'s insertion order, then flat index),
    so every rank gets the same mask (:func:`sparsecomm.mask.topk_mask`). Names matching
    ``always`` are kept whole and count toward ``k``. With ``model``, the mask covers all of its
    parameters, those absent from ``diff`` (frozen ones) all False.
    """
    n = sum(d.numel() for d in diff.values())
    k = count_for_density(density, n, field=field)
    mask = topk_mask({name: d.detach().abs() for name, d in diff.items()}, k, always)
    if model is None:
        return mask
    bits = {name: (mask[name] if name in mask else torch.zeros(p.shape, dtype=torch.bool))
            for name, p in _unwrap(model).named_parameters()}
    return Mask(bits).validate(model)
