"""Masked optimizers: torch's own AdamW / SGD run over the k selected entries, packed.

Each optimizer owns one packed tensor per (device, dtype) of the model's parameters, holding
the selected entries back to back (parameters in ``named_parameters()`` order, ascending flat
positions within each). A step gathers the current values and gradients of the selected
entries into it (O(k)), runs the stock ``torch.optim`` update on it, and scatters the values
back (O(k)). Hence:

* optimizer state (moments, momentum) has k entries, not the model's size;
* unselected entries are never written: they stay bit-identical, weight decay included;
* the arithmetic is torch's own, so selected entries follow ``torch.optim.AdamW``/``SGD`` exactly;
* these are real ``torch.optim.Optimizer`` subclasses: LR schedulers and ``state_dict`` work.

Values are re-gathered every step, so anything else that writes the parameters between steps
(a dense "full" step, loading a checkpoint) is picked up.

Memory, O(k) for k selected entries of fp32 parameters: the packed values and their gradient
(4k + 4k bytes), the flat positions (int64 on the parameters' device, 8k) and their global keys
(int64 on the CPU, 8k, used by :meth:`reset_mask`); plus the state: ``MaskedAdamW`` 8k
(``exp_avg``, ``exp_avg_sq``), ``MaskedSGD`` 4k with momentum. AdamW: 32 bytes per selected
entry (a dense ``torch.optim.AdamW`` holds 8 bytes per entry of the model). A step allocates
transient gathers of k entries and torch's own step temporaries over the k packed entries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .mask import Mask, _unwrap


@dataclass
class _Segment:
    """Selected entries of one parameter: ``param.view(-1)[index]`` <-> ``packed[start:stop]``."""

    param: nn.Parameter
    index: torch.Tensor  # int64 flat positions, on the parameter's device
    start: int
    stop: int
    key: torch.Tensor  # int64 global position (offset of the parameter in the model + index), CPU


def _plan(model: nn.Module, mask: Mask) -> dict[tuple, list[_Segment]]:
    """Group the selected entries of trainable parameters by (device, dtype), in model order."""
    mask.validate(model)
    groups: dict[tuple, list[_Segment]] = {}
    offset = 0
    for name, p in model.named_parameters():
        idx = mask.flat_indices(name)
        if p.requires_grad and idx.numel():
            segs = groups.setdefault((p.device, p.dtype), [])
            start = segs[-1].stop if segs else 0
            segs.append(_Segment(p, idx.to(p.device), start, start + idx.numel(), idx + offset))
        offset += p.numel()
    return groups


class _PackedMixin:
    """Gather/scatter between the model's parameters and the optimizer's packed tensors."""

    def _setup(self, model: nn.Module, mask: Mask) -> list[torch.Tensor]:
        self.model = _unwrap(model)
        self.mask = mask
        self._groups = _plan(self.model, mask)
        if not self._groups:
            raise ValueError("the mask selects no trainable entry of the model; nothing to optimize")
        self._packed = [
            torch.zeros(segs[-1].stop, dtype=dtype, device=device)
            for (device, dtype), segs in self._groups.items()
        ]
        return self._packed

    @torch.no_grad()
    def _gather(self) -> bool:
        """Copy selected values and gradients in. Returns False if no gradient exists at all."""
        any_grad = False
        for packed, segs in zip(self._packed, self._groups.values()):
            if packed.grad is None:
                packed.grad = torch.zeros_like(packed)
            for s in segs:
                flat = s.param.detach().view(-1)
                packed[s.start:s.stop] = flat.index_select(0, s.index)
                if s.param.grad is None:
                    packed.grad[s.start:s.stop] = 0
                else:
                    any_grad = True
                    packed.grad[s.start:s.stop] = s.param.grad.view(-1).index_select(0, s.index)
        return any_grad

    @torch.no_grad()
    def _scatter(self) -> None:
        for packed, segs in zip(self._packed, self._groups.values()):
            for s in segs:
                s.param.view(-1).index_copy_(0, s.index, packed[s.start:s.stop])

    def _masked_step(self, base_step, closure):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._gather():
            base_step()
            self._scatter()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the model's gradients (all of them, as ``model.zero_grad``) and the packed ones."""
        self.model.zero_grad(set_to_none=set_to_none)
        for packed in self._packed:
            packed.grad = None if set_to_none else (packed.grad.zero_() if packed.grad is not None else None)

    def state_bytes(self) -> int:
        """Bytes held in optimizer state tensors (moments, momentum), excluding the packed values."""
        total = 0
        for st in self.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    total += v.numel() * v.element_size()
        return total

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["mask_digest"] = self.mask.digest()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        digest = state_dict.pop("mask_digest", None)
        if digest is not None and digest != self.mask.digest():
            raise ValueError(
                f"optimizer state was saved for mask {digest[:12]} but this optimizer holds mask "
                f"{self.mask.digest()[:12]}; build the optimizer with the mask saved in the checkpoint"
            )
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def reset_mask(self, mask: Mask) -> None:
        """Switch to a new mask (mask refresh) keeping the state of entries that stay selected.

        Entries selected by both masks keep their moments/momentum; new entries start at zero.
        Scalar state (Adam's ``step``) is kept, so bias correction continues from the current step.
        """
        old_groups, old_packed = self._groups, self._packed
        old_state = {key: self.state.get(p, {}) for key, p in zip(old_groups, old_packed)}
        old_keys = {key: torch.cat([s.key for s in segs]) for key, segs in old_groups.items()}
        self._setup(self.model, mask)
        new_state = {}
        for key, packed in zip(self._groups, self._packed):
            new_keys = torch.cat([s.key for s in self._groups[key]])
            st = {}
            for name, v in old_state.get(key, {}).items():
                if isinstance(v, torch.Tensor) and v.dim() == 1 and key in old_keys:
                    carried = torch.zeros_like(packed)
                    keep = torch.isin(new_keys, old_keys[key])
                    src = torch.searchsorted(old_keys[key], new_keys[keep])
                    carried[keep.to(v.device)] = v[src.to(v.device)]
                    st[name] = carried
                else:
                    st[name] = v
            if st:
                new_state[packed] = st
        self.state.clear()
        self.state.update(new_state)
        for group in self.param_groups:
            group["params"] = list(self._packed)


class MaskedAdamW(_PackedMixin, torch.optim.AdamW):
    """``torch.optim.AdamW`` over the mask's k selected entries; the rest stay bit-identical.

    State: ``exp_avg`` and ``exp_avg_sq`` of k entries per (device, dtype) group (2 x k x 4 bytes
    for fp32), against 2 x n x 4 for ``torch.optim.AdamW``.
    """

    def __init__(self, model: nn.Module, mask: Mask, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, **kwargs):
        torch.optim.AdamW.__init__(self, self._setup(model, mask), lr=lr, betas=tuple(betas), eps=eps,
                                   weight_decay=weight_decay, **kwargs)

    def step(self, closure=None):
        return self._masked_step(super().step, closure)


class MaskedSGD(_PackedMixin, torch.optim.SGD):
    """``torch.optim.SGD`` over the mask's k selected entries; the rest stay bit-identical.

    State: ``momentum_buffer`` of k entries when ``momentum > 0``, none otherwise.
    """

    def __init__(self, model: nn.Module, mask: Mask, lr: float = 1e-2, momentum: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0, **kwargs):
        torch.optim.SGD.__init__(self, self._setup(model, mask), lr=lr, momentum=momentum, nesterov=nesterov,
                                 weight_decay=weight_decay, **kwargs)

    def step(self, closure=None):
        return self._masked_step(super().step, closure)
