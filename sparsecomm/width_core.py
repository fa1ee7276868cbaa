"""Width cores: the first ``fraction`` of every hidden layer's units, as a mask and as a model.

A *unit* is an output feature of a Linear or an output channel of a Conv2d. The width core of
a chain of layers keeps, in every layer but the last (the classifier head), its first
``m = ceil(fraction x width)`` units; the head keeps all its outputs. Its parameters are:

* Linear / Conv2d ``i``: ``weight[:m_i, :m_{i-1}]`` (conv: ``[:m_i, :m_{i-1}, :, :]``) and
  ``bias[:m_i]``; the first layer reads every input feature (``m_0`` = all inputs);
* BatchNorm after it: ``weight[:m_i]``, ``bias[:m_i]`` (and, when exported, its running stats);
* a Flatten from ``C`` channels of ``H x W`` into a Linear maps core channel ``c < m`` to the
  Linear's input columns ``c*H*W ... (c+1)*H*W - 1`` (channel-major), i.e. the first ``m*H*W``;
* the head: ``weight[:, :m_last]`` and its whole bias.

:func:`width_core_mask` gives these entries as a :class:`~sparsecomm.Mask` (a core for the
core/full schedule: core steps train and send only them). :func:`export_core` builds the core
as a standalone model of the same class with the layers narrowed.

What the exported core computes: the full model with the NON-core units removed, i.e. with
every weight from a non-core unit to the next layer (``W_i[:, m_{i-1}:]``, the head's
``weight[:, m_last:]``) set to zero. During core/full training the full steps also train the
weights from non-core into core units, so the full model and its exported core differ by those
contributions; the core's accuracy alone is the exported model's, evaluated on its own
(``tests/test_width_core.py`` checks ``export_core(model)(x) == model_with_those_weights_zeroed(x)``).

Supported models: classes that declare ``layer_chain = True`` (the app's ``MLP`` and ``SmallCNN``)
and any ``nn.Sequential`` built from Linear, Conv2d, BatchNorm1d/2d,
element-wise activations, Dropout, pooling and Flatten; each applies its layers in the order
they are registered, which is what this module relies on. Residual networks (ResNet) and
transformers (GPT) are refused: their units are tied across skip connections and heads.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from .mask import Mask, _unwrap
from .mask import check_fraction as _check_fraction

_PASS_THROUGH = (nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Identity,
                 nn.Dropout, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class _Layer:
    """One unit-producing layer of the chain and what reads its units."""

    name: str                      # module name in the model
    module: nn.Module              # nn.Linear or nn.Conv2d
    keep_out: int                  # m_i: core units of this layer (all outputs for the head)
    keep_in: int                   # input columns / channels read by the core (m_{i-1} x spatial)
    norm: tuple[str, nn.Module] | None = None   # BatchNorm directly over this layer's units


def _supported(model: nn.Module) -> bool:
    """A plain ``nn.Sequential``, or a model that declares itself one chain of layers
    (``layer_chain = True`` on its class, as the app's ``MLP`` and ``SmallCNN`` do)."""
    return isinstance(model, nn.Sequential) or bool(getattr(type(model), "layer_chain", False))


def check_fraction(fraction: float, field: str = "fraction") -> float:
    """Validate the core's fraction of each hidden layer's units, in (0, 1]."""
    return _check_fraction(fraction, field, "the fraction of each hidden layer's units in the core", "0.5")


def core_width(width: int, fraction: float) -> int:
    """Units of a ``width``-unit layer in the core: ``ceil(fraction x width)`` (at least 1)."""
    return max(1, math.ceil(check_fraction(fraction) * width - 1e-9))


def _chain(model: nn.Module, fraction: float) -> list[_Layer]:
    """The unit-producing layers in forward order, with the core's sizes worked out."""
    model = _unwrap(model)
    if not _supported(model):
        raise TypeError(
            f"width cores are defined for plain nn.Sequential chains and models whose class sets layer_chain = True "
            f"chains, not {type(model).__name__}: its layers are not one chain (skip connections, "
            f"attention heads); use a Fisher or random mask as the core instead")
    fraction = check_fraction(fraction)
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    layers: list[_Layer] = []
    prev_units: int | None = None     # units of the previous layer (channels or features)
    prev_core: int | None = None      # their core count
    spatial = 1                       # Flatten multiplier pending for the next Linear
    flattened = False
    for name, m in leaves:
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            if isinstance(m, nn.Conv2d) and (m.groups != 1):
                raise TypeError(f"width core: grouped convolution {name!r} is not supported")
            n_in = m.in_features if isinstance(m, nn.Linear) else m.in_channels
            if prev_units is None:
                keep_in = n_in
            elif isinstance(m, nn.Linear) and flattened:
                if n_in % prev_units:
                    raise TypeError(f"width core: {name!r} reads {n_in} features after a Flatten of "
                                    f"{prev_units} channels (not a multiple)")
                spatial = n_in // prev_units
                keep_in = prev_core * spatial
            else:
                if n_in != prev_units:
                    raise TypeError(f"width core: {name!r} reads {n_in} inputs but the previous layer "
                                    f"has {prev_units} units; the model is not a simple chain")
                keep_in = prev_core
            n_out = m.out_features if isinstance(m, nn.Linear) else m.out_channels
            layers.append(_Layer(name, m, core_width(n_out, fraction), keep_in))
            prev_units, prev_core, flattened = n_out, layers[-1].keep_out, False
        elif isinstance(m, _NORMS):
            if not layers or layers[-1].norm is not None or m.num_features != prev_units:
                raise TypeError(f"width core: norm {name!r} does not follow a layer of {m.num_features} units")
            layers[-1].norm = (name, m)
        elif isinstance(m, nn.Flatten):
            flattened = True
        elif isinstance(m, _PASS_THROUGH):
            pass
        elif any(True for _ in m.parameters(recurse=False)):
            raise TypeError(f"width core: layer {name!r} ({type(m).__name__}) is not supported")
    if not layers or not isinstance(layers[-1].module, nn.Linear):
        raise TypeError("width core: the model must end in a Linear classifier head")
    layers[-1].keep_out = layers[-1].module.out_features   # the head's outputs stay whole
    if layers[-1].norm is not None:
        raise TypeError("width core: a norm after the classifier head is not supported")
    return layers


def core_units(model: nn.Module, fraction: float) -> dict[str, int]:
    """``{layer name: units in the core}`` for every Linear/Conv2d (the head: all its outputs)."""
    return {layer.name: layer.keep_out for layer in _chain(model, fraction)}


def width_core_mask(model: nn.Module, fraction: float) -> Mask:
    """The width core's parameter entries as a Mask over all of ``model``'s parameters."""
    model = _unwrap(model)
    bits = {n: torch.zeros(p.shape, dtype=torch.bool) for n, p in model.named_parameters()}
    for layer in _chain(model, fraction):
        o, i = layer.keep_out, layer.keep_in
        bits[f"{layer.name}.weight"][:o, :i] = True
        if layer.module.bias is not None:
            bits[f"{layer.name}.bias"][:o] = True
        if layer.norm is not None:
            nname, norm = layer.norm
            if norm.affine:
                bits[f"{nname}.weight"][:o] = True
                bits[f"{nname}.bias"][:o] = True
    return Mask(bits).validate(model)


@torch.no_grad()
def isolate_core(model: nn.Module, fraction: float) -> nn.Module:
    """Zero, in place, every weight from a non-core unit into a core unit (and the head's
    non-core input columns); returns ``model``.

    Afterwards the full model's output IS the exported core's output (``export_core``), and it
    stays so while only the core's entries train (core steps: the zeroed weights are outside the
    width-core mask, so the masked optimizer never moves them): core-only training then trains
    exactly the standalone core. Full steps (core/full) train the zeroed weights like any other.
    Non-core units still compute; nothing reads them until a full step grows those weights.
    """
    for layer in _chain(model, fraction)[1:]:   # the first layer reads the inputs, all in the core
        layer.module.weight[:layer.keep_out, layer.keep_in:] = 0
    return model


class NestedCore:
    """Keep the width core a standalone subnetwork of the full model during core/full training.

    * At construction, :func:`isolate_core`: weights from non-core into core units start at 0.
    * Core steps (``begin_step(full=False)`` ... ``end_step()``): the head reads the core's units
      only (its non-core columns are 0 for the forward and backward and restored bit-exactly at
      ``end_step``), so a core step's loss is the standalone core's: core steps train exactly
      ``export_core(model)``.
    * Full steps (``begin_step(full=True)`` ... ``end_step()``): everything trains; afterwards the
      hidden layers' non-core -> core weights go back to 0, so core units never read non-core
      units (a nested model, as in HeteroFL / ordered dropout). The head's non-core columns DO
      train, so the full model uses all its units.

    The exported core is then the full model's own core view. Nothing travels; every rank applies
    the same in-place edits to identical weights. Call ``end_step`` after the optimizer step
    (the masked optimizer never writes the head's non-core columns, being outside the core).
    """

    def __init__(self, model: nn.Module, fraction: float):
        self.layers = _chain(model, fraction)
        isolate_core(model, fraction)
        self._saved: torch.Tensor | None = None
        self._full = False

    @torch.no_grad()
    def begin_step(self, full: bool) -> None:
        self._full = bool(full)
        if not full:
            head = self.layers[-1]
            w = head.module.weight
            self._saved = w[:, head.keep_in:].clone()
            w[:, head.keep_in:] = 0

    @torch.no_grad()
    def end_step(self) -> None:
        if self._saved is not None:
            head = self.layers[-1]
            head.module.weight[:, head.keep_in:] = self._saved
            self._saved = None
        if self._full:
            for layer in self.layers[1:-1]:
                layer.module.weight[:layer.keep_out, layer.keep_in:] = 0


def _narrow_linear(m: nn.Linear, o: int, i: int) -> nn.Linear:
    new = nn.Linear(i, o, bias=m.bias is not None, device=m.weight.device, dtype=m.weight.dtype)
    return _copy_narrowed(new, m, o, i)


def _narrow_conv(m: nn.Conv2d, o: int, i: int) -> nn.Conv2d:
    new = nn.Conv2d(i, o, m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation,
                    bias=m.bias is not None, padding_mode=m.padding_mode,
                    device=m.weight.device, dtype=m.weight.dtype)
    return _copy_narrowed(new, m, o, i)


@torch.no_grad()
def _copy_narrowed(new: nn.Module, m: nn.Module, o: int, i: int) -> nn.Module:
    """``new`` holding ``m``'s first ``o`` outputs over its first ``i`` inputs."""
    new.weight.copy_(m.weight[:o, :i])
    if m.bias is not None:
        new.bias.copy_(m.bias[:o])
    return new


def _narrow_norm(m: nn.Module, o: int) -> nn.Module:
    new = type(m)(o, eps=m.eps, momentum=m.momentum, affine=m.affine,
                  track_running_stats=m.track_running_stats,
                  device=(m.weight.device if m.affine else None), dtype=(m.weight.dtype if m.affine else None))
    with torch.no_grad():
        if m.affine:
            new.weight.copy_(m.weight[:o])
            new.bias.copy_(m.bias[:o])
        if m.track_running_stats:
            new.running_mean.copy_(m.running_mean[:o])
            new.running_var.copy_(m.running_var[:o])
            new.num_batches_tracked.copy_(m.num_batches_tracked)
    new.train(m.training)
    return new


def export_core(model: nn.Module, fraction: float) -> nn.Module:
    """A standalone model of the same class holding only the width core (a new module).

    Every Linear/Conv2d is narrowed to its core units and core inputs, every BatchNorm to its
    core channels (running statistics included); the head keeps all its outputs. Its forward
    equals ``model``'s forward with every weight leaving a non-core unit set to zero. Attributes
    that record widths on the class (none in ``sparsecomm.app.models``) are not rewritten.
    """
    model = _unwrap(model)
    layers = _chain(model, fraction)
    core = copy.deepcopy(model)
    for layer in layers:
        o, i = layer.keep_out, layer.keep_in
        m = layer.module
        new = _narrow_linear(m, o, i) if isinstance(m, nn.Linear) else _narrow_conv(m, o, i)
        new.train(m.training)
        core.set_submodule(layer.name, new)
        if layer.norm is not None:
            core.set_submodule(layer.norm[0], _narrow_norm(layer.norm[1], o))
    return core
