"""``mask=width_core``: partially masked training (Mohtashami et al., 2021).

The mask keeps ``mask.fraction`` of each hidden layer's units (:mod:`sparsecomm.width_core`);
with ``schedule=core_full`` core steps (k x 4 bytes) alternate with full steps (n x 4). With
``mask.nested`` (default) the core stays a standalone subnetwork, so the core exported at the end
is the function its steps trained. The end of the run exports the core and evaluates it alone
(one all-reduce of 3 float64); ``mask.compare_alone`` also trains the same core architecture
alone, from the same initial weights, on the same batches under plain DDP (its bytes reported
as ``core_alone_bytes``), the paper's comparison.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from sparsecomm.mask import Mask
from sparsecomm.width_core import NestedCore, export_core, width_core_mask

from ..config import ConfigError
from ..data import ShardedData, evaluate
from ..engine import StepEngine
from ..optimizers import build_optimizer
from .base import MaskKind, Setting


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

    def before_step(self, run, step: int, dense: bool) -> None:
        if self.nested is not None:  # a core step's forward is the standalone core's
            self.nested.begin_step(full=dense)

    def after_step(self) -> None:
        if self.nested is not None:
            self.nested.end_step()

    def outputs(self, run) -> dict[str, Any]:
        """Export the trained model's core and evaluate it alone (collective); with
        ``compare_alone``, also the same core trained alone (:func:`train_alone`)."""
        fraction = float(self.cfg.fraction)
        core = export_core(run.model, fraction).to(run.device)
        res = evaluate(core, run.data.test_loader, run.task.loss_fn, run.device)
        out = {"core_fraction": fraction, "core_numel": sum(p.numel() for p in core.parameters()),
               "core_acc": res["test_acc"], "core_loss": res["test_loss"]}
        run.log.info(f"width core ({fraction:g} of each layer's units, {out['core_numel']:,} parameters), exported "
                     f"and evaluated alone: test accuracy {res['test_acc']:.4f}")
        if self.initial_core is not None:
            alone = train_alone(self.initial_core, run, lr=self.cfg.alone_lr)
            out.update({"core_alone_acc": alone["test_acc"], "core_alone_loss": alone["test_loss"],
                        "core_alone_bytes": alone["bytes_sent"], "core_alone_lr": alone["lr"]})
            run.log.info(f"the same core trained alone ({run.schedule.steps} steps, lr {alone['lr']:g}): "
                         f"test accuracy {alone['test_acc']:.4f}")
        return out

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


def train_alone(model: torch.nn.Module, run, lr: float | None = None) -> dict[str, Any]:
    """Train ``model`` densely under plain DDP for the run's number of steps, on a fresh stream of
    the same per-rank batches (same seed), with the run's step engine, and evaluate it.
    Sends ``numel x 4`` bytes a step."""
    cfg, device = run.cfg, run.device
    model = copy.deepcopy(model).to(device).train()
    data = ShardedData(run.task, run.rank, run.world, batch_size=cfg.batch_size,
                       eval_batch_size=cfg.eval_batch_size, seed=cfg.seed, device=device, num_workers=cfg.num_workers)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt, base_lr = build_optimizer(cfg.optim, model)
    base_lr = float(lr) if lr is not None else base_lr
    engine = StepEngine(ddp, run.task.loss_fn)
    for step in range(run.schedule.steps):
        engine.step(data.next_batch(), opt, base_lr * run.lr_schedule.factor(step), step=step)
    res = evaluate(model, data.test_loader, run.task.loss_fn, device)
    per_step = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {**res, "bytes_sent": per_step * run.schedule.steps, "lr": base_lr}
