"""``mask=width_core``: partially masked training (Mohtashami et al., 2021).

The mask keeps ``mask.fraction`` of each hidden layer's units (:mod:`sparsecomm.width_core`);
with ``schedule=core_full`` core steps (k x 4 bytes) alternate with full steps (n x 4). With
``mask.nested`` (default) the core stays a standalone subnetwork, so the core exported at the end
is the function its steps trained. The end of the run exports the core and evaluates it alone
(one all-reduce of 3 float64); ``mask.compare_alone`` also asks the trainer to train the same
core architecture alone (a :class:`~sparsecomm.app.masks.base.Comparison`), from the same
initial weights, on the same batches under plain DDP, through the trainer's own loop (its bytes
reported as ``core_alone_bytes``), the paper's comparison.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from sparsecomm.mask import Mask
from sparsecomm.width_core import NestedCore, export_core, width_core_mask

from ..config import ConfigError
from ..data import evaluate
from .base import Change, Comparison, MaskKind, Setting, View


class WidthCoreKind(MaskKind):
    name = "width_core"

    def __init__(self, cfg: Mapping, setting: Setting):
        super().__init__(cfg, setting)
        try:  # a model that is not one chain of layers stops here
            self.k = width_core_mask(setting.model, cfg.fraction).num_selected
        except TypeError as e:
            raise ConfigError(f"mask=width_core on task {setting.task.name}: {e}") from None
        self.nested = NestedCore(setting.model, cfg.fraction) if cfg.nested else None
        self.initial_core = export_core(setting.model, cfg.fraction) if cfg.compare_alone else None

    def build(self, model: torch.nn.Module) -> Mask:
        return width_core_mask(model, self.cfg.fraction)

    def before_step(self, view: View) -> None:
        if self.nested is not None:  # a core step's forward is the standalone core's
            self.nested.begin_step(full=view.dense)

    def after_step(self, view: View) -> None:
        if self.nested is not None:
            self.nested.end_step()

    def outputs(self, view: View) -> Change:
        """Export the trained model's core and evaluate it alone (collective); with
        ``compare_alone``, ask for the same core trained alone from its initial weights."""
        fraction = float(self.cfg.fraction)
        core = export_core(view.model, fraction).to(view.device)
        res = evaluate(core, view.data.test_loader, view.task.loss_fn, view.device)
        out = {"core_fraction": fraction, "core_numel": sum(p.numel() for p in core.parameters()),
               "core_acc": res["test_acc"], "core_loss": res["test_loss"]}
        line = (f"width core ({fraction:g} of each layer's units, {out['core_numel']:,} parameters), exported "
                f"and evaluated alone: test accuracy {res['test_acc']:.4f}")
        alone = None if self.initial_core is None else Comparison(
            self.initial_core, prefix="core_alone", label="the same core trained alone", lr=self.cfg.alone_lr)
        return Change(fields=out, lines=[line], compare=alone)

    @staticmethod
    def report_lines(s: Mapping[str, Any]) -> list[str]:
        lines = []
        if "core_acc" in s:
            lines.append(f"  width core       {s['core_acc']:.4f} test accuracy (exported, evaluated alone; "
                         f"{s['core_numel']:,} parameters)")
        if "core_alone_acc" in s:
            lines.append(f"  core alone       {s['core_alone_acc']:.4f} test accuracy (same core trained alone, "
                         f"same steps, lr {s['core_alone_lr']:g})")
        return lines

