"""Trainer components for diff pruning, task diffs and width cores (issue 5).

The trainer (:mod:`sparsecomm.app.trainer`) wires these in; each is usable and testable alone::

    build_schedule(cfg)                        the step plan; diff pruning's L0 phase is part of the
                                               dense phase (after schedule.dense_steps warm-up steps)
    L0Phase                                    mask=diff_pruning: wrap the model, the 2-group optimizer,
                                               the L0 penalty, then project + materialize
    TaskDiffRecorder                           base snapshot + union of the masks used; rank 0 writes
                                               task_diff.safetensors (sparsecomm.diff.save) at the end
    width_core_report                          export the width core, evaluate it alone, and (optionally)
                                               train the same core architecture alone for comparison
                                               (the trainer keeps the core nested during training with
                                               sparsecomm.width_core.NestedCore, mask.nested=true)
    run_outputs / summary_lines                the summary fields above (collective) and their report lines

What travels (bytes per step and rank, before the ring factor ``2 (N-1)/N``; n = the model's
entries, k = the mask's):

* diff pruning, L0 phase: DENSE, the gradients of every ``w`` AND every ``log_alpha`` entry,
  ``(2n - #head entries [ungated]) x 4`` bytes (+ 4 per tensor when structured) -- about twice
  dense DDP. Counted in ``bytes_sent`` and, separately, ``l0_bytes_sent``; ``dense_bytes`` counts
  what dense DDP of the plain model sends in those steps (``n x 4``), so the ratio is honest.
* diff pruning, fixed-mask phase: ``k x 4``, as FISH.
* width core: ``k x 4`` on core steps; ``n x 4`` on the full steps of ``schedule=core_full``.
* the end of a run: the task diff is a file, nothing travels; the width-core report costs one
  all-reduce of 3 float64 per evaluation, and ``compare_alone`` trains the core alone under
  plain DDP (its bytes are reported as ``core_alone_bytes``).
"""
from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from sparsecomm import distributed as sdist
from .schedule import Schedule


def build_schedule(cfg: Mapping) -> Schedule:
    """The run's step plan from ``cfg.schedule``; with ``mask=diff_pruning`` the L0 phase
    (``mask.l0_steps`` steps after the ``schedule.dense_steps`` warm-up) is part of the dense phase,
    so the mask is projected before step ``dense_steps + l0_steps`` and core/full cycles count from
    there."""
    mask = cfg.mask
    schedule = Schedule.from_config(cfg.schedule, cfg.steps, cfg.get("seed", 0), masked=mask.get("name") != "dense")
    if mask.get("name") == "diff_pruning":
        schedule = dataclasses.replace(schedule, dense_steps=schedule.dense_steps + int(mask.l0_steps))
    return schedule


# --- diff pruning in the app ----------------------------------------------------------------------

class L0Phase:
    """``mask=diff_pruning`` in the trainer: the L0 phase and its hand-over to the fixed mask.

    Steps ``[start, start + l0_steps)`` train a :class:`~sparsecomm.diff_pruning.DiffPruning`
    wrapper of the model (base frozen; ``w`` at ``optim.dense_lr``, ``log_alpha`` at
    ``mask.alpha_lr``) on ``loss + l0_penalty x E[L0]``; :meth:`finish` projects ``|z x w|`` to
    exactly ``mask.density`` (one global threshold; ``always`` kept whole) and returns the plain
    model ``base + masked diff`` that the fixed-mask phase fine-tunes.
    """

    def __init__(self, cfg: Mapping, head: list[str], start: int):
        self.cfg, self.head, self.start = cfg, list(head), int(start)
        self.l0_steps = int(cfg.l0_steps)
        self.wrapper = None
        self.active, self._sent0 = False, 0
        self.bytes_sent = 0          # what the L0 phase handed to all-reduce (w + log_alpha gradients)
        self.stats: dict[str, Any] = {}

    def wrap(self, model: torch.nn.Module, bytes_sent: int = 0) -> torch.nn.Module:
        """Freeze ``model`` in place as the base and return the wrapper to train (same device).
        ``bytes_sent``: the run's byte counter now (the L0 phase's bytes are counted from here)."""
        from sparsecomm.diff_pruning import DiffPruning

        cfg = self.cfg
        self.wrapper = DiffPruning(model, structured=bool(cfg.structured), stretch=tuple(cfg.stretch),
                                   log_alpha_init=float(cfg.log_alpha_init), temperature=float(cfg.temperature),
                                   ungated=self.head if cfg.ungated_head else ())
        self.wrapper.train(model.training)
        self.active, self._sent0 = True, int(bytes_sent)
        return self.wrapper

    def optimizer(self, optim: Mapping) -> tuple[torch.optim.Optimizer, float]:
        """``(optimizer, base lr)``: torch's AdamW/SGD with two groups, ``w`` at ``optim.dense_lr``
        (``optim.weight_decay``) and the gates at ``mask.alpha_lr`` (no decay). The gate group's
        ``lr_scale`` keeps the ratio when the lr schedule sets the step's lr (``schedule.set_lr``)."""
        from .trainer import dense_optimizer

        w = self.wrapper
        lr, alpha_lr = float(optim.dense_lr), float(self.cfg.alpha_lr)
        gates = list(w.log_alpha) + ([w.group_log_alpha] if w.group_log_alpha is not None else [])
        groups = [{"params": list(w.diff)}]  # lr and weight decay: optim/'s
        if gates:
            groups.append({"params": gates, "lr": alpha_lr, "weight_decay": 0.0, "lr_scale": alpha_lr / lr})
        return dense_optimizer(optim, groups, lr), lr

    def penalty(self) -> torch.Tensor:
        """``l0_penalty x E[L0]`` to add to the task loss (the same on every rank)."""
        return float(self.cfg.l0_penalty) * self.wrapper.expected_l0()

    @torch.no_grad()
    def finish(self, always: list[str], bytes_sent: int) -> tuple[Any, torch.nn.Module]:
        """``(mask, plain model)``: the projection of the learned diff and ``base + mask x diff``.
        ``bytes_sent``: the run's byte counter at the end of the L0 phase.

        Identical on every rank (same ``w`` and ``log_alpha`` after averaged updates; ties broken
        by position); the trainer's ``set_mask`` checks the digests agree.
        """
        w = self.wrapper
        mask = w.project(float(self.cfg.density), always=always, field="mask.density")
        model = w.materialize(mask)
        model.train(w.training)
        self.bytes_sent = int(bytes_sent) - self._sent0
        self.stats = {"l0_expected_l0": float(w.expected_l0()), "l0_gates_open": w.nonzero_fraction(),
                      "l0_comm_numel": w.comm_numel}
        self.active = False
        self.wrapper = None
        return mask, model

    def summary(self) -> dict[str, Any]:
        return {"l0_steps": self.l0_steps, "l0_bytes_sent": self.bytes_sent, **self.stats}

    # checkpoints (the trainer's ``extra_state``): the byte count and the finished phase's report.
    # A checkpoint taken DURING the L0 phase holds the wrapper as the model: the trainer enters the
    # phase (Trainer._enter_l0) before loading it.
    def state_dict(self) -> dict[str, Any]:
        return {"bytes_sent": self.bytes_sent, "sent0": self._sent0, "stats": dict(self.stats)}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        self.bytes_sent, self._sent0, self.stats = int(sd["bytes_sent"]), int(sd["sent0"]), dict(sd["stats"])


# --- the task diff written at the end of a masked run ---------------------------------------------

class TaskDiffRecorder:
    """What the end-of-run task diff needs: the base weights and every mask the run trained with.

    The base is the model the first masked step started from (the initial/pretrained model, or the
    model after ``schedule.dense_steps`` warm-up steps; for diff pruning the frozen base of the L0
    phase). Every later change went through a masked optimizer over one of the masks, so the union
    of the masks covers it; a core/full "full" step updates the whole model, and the diff is then
    skipped with that reason.
    """

    def __init__(self, template: torch.nn.Module | None = None) -> None:
        self.template = template  # a model of the base's architecture, to rebuild the base on resume
        self.base: torch.nn.Module | None = None
        self.base_step: int | None = None
        self.union = None
        self.skip_reason: str | None = None

    # checkpoints (the trainer's ``extra_state``): the base weights and the masks so far
    def state_dict(self) -> dict[str, Any]:
        return {"base": {k: v.detach().cpu().clone() for k, v in self.base.state_dict().items()}
                if self.base is not None else None,
                "base_step": self.base_step, "skip_reason": self.skip_reason,
                "union": {n: self.union[n] for n in self.union} if self.union is not None else None}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        from sparsecomm.mask import Mask

        self.base = None
        if sd["base"] is not None:
            self.base = copy.deepcopy(self.template)
            self.base.load_state_dict(sd["base"])
        self.base_step, self.skip_reason = sd["base_step"], sd["skip_reason"]
        self.union = Mask(sd["union"]) if sd["union"] is not None else None

    def set_base(self, model: torch.nn.Module, step: int) -> None:
        if self.base is None:
            self.base = copy.deepcopy(model)
            self.base_step = int(step)

    def add_mask(self, mask) -> None:
        self.union = mask if self.union is None else self.union.union(mask)

    def full_step(self, step: int) -> None:
        if self.skip_reason is None:
            self.skip_reason = (f"step {step} was a core/full 'full' step (dense update of the whole model), "
                                f"so the run's change is not sparse")

    def write(self, model: torch.nn.Module, run_dir: str) -> dict[str, Any]:
        """Rank 0: write ``task_diff.safetensors`` (and ``base.safetensors`` when the base is not the
        initial model); every rank returns the same report (rank 0's, broadcast: a few bytes)."""
        report: dict[str, Any] = {}
        if sdist.is_main_process():
            report = self._write(model, run_dir)
        if sdist.is_initialized() and sdist.world_size() > 1:
            box = [report]
            dist.broadcast_object_list(box, src=0)
            report = box[0]
        return report

    def _write(self, model: torch.nn.Module, run_dir: str) -> dict[str, Any]:
        from sparsecomm import diff as sdiff

        if self.skip_reason is not None or self.base is None or self.union is None:
            return {"task_diff": None, "task_diff_skipped": self.skip_reason or "no mask was used"}
        path = os.path.join(run_dir, "task_diff.safetensors")
        try:
            sdiff.save(model, self.base, self.union, path)
        except sdiff.LossyDiff as e:  # a bug, not a setting: say so in the summary instead of dying at the end
            return {"task_diff": None, "task_diff_skipped": f"not sparse: {e}"}
        size = sdiff.size_report(path)
        report = {"task_diff": path, "task_diff_bytes": size["file_bytes"],
                  "full_model_bytes": size["full_model_bytes"], "task_diff_ratio": size["ratio"],
                  "task_diff_entries": size["num_selected"], "task_diff_base": "initial model"}
        if self.base_step:
            from safetensors.torch import save_model

            base_path = os.path.join(run_dir, "base.safetensors")
            save_model(self.base, base_path)
            report["task_diff_base"] = f"{base_path} (the model after {self.base_step} dense steps)"
        return report


# --- width cores: export, evaluate alone, compare with the core trained alone ---------------------

def width_core_report(trainer, initial_core: torch.nn.Module | None) -> dict[str, Any]:
    """Export the width core of the trained model and evaluate it alone (collective: every rank).

    With ``initial_core`` (``mask.compare_alone=true``: the core of the INITIAL model, exported at
    the start), also train that core architecture alone, from the same weights, for the same
    number of steps on the same batches under plain DDP (dense optimizer at ``mask.alone_lr``,
    default ``optim.dense_lr``, same lr schedule) and evaluate it: the paper's comparison.
    """
    from .data import evaluate
    from sparsecomm.width_core import export_core

    cfg, fraction = trainer.cfg, float(trainer.cfg.mask.fraction)
    core = export_core(trainer.model, fraction).to(trainer.device)
    res = evaluate(core, trainer.data.test_loader, trainer.task.loss_fn, trainer.device)
    out = {"core_fraction": fraction, "core_numel": sum(p.numel() for p in core.parameters()),
           "core_acc": res["test_acc"], "core_loss": res["test_loss"]}
    trainer.log.info(f"width core ({fraction:g} of each layer's units, {out['core_numel']:,} parameters), exported "
                     f"and evaluated alone: test accuracy {res['test_acc']:.4f}")
    if initial_core is not None:
        t = trainer
        alone = train_alone(initial_core, t, lr=cfg.mask.get("alone_lr"))
        out.update({"core_alone_acc": alone["test_acc"], "core_alone_loss": alone["test_loss"],
                    "core_alone_bytes": alone["bytes_sent"], "core_alone_lr": alone["lr"]})
        t.log.info(f"the same core trained alone ({t.schedule.steps} steps, lr {alone['lr']:g}): "
                   f"test accuracy {alone['test_acc']:.4f}")
    return out


def train_alone(model: torch.nn.Module, trainer, lr: float | None = None) -> dict[str, Any]:
    """Train ``model`` densely under plain DDP for the trainer's number of steps, on a fresh stream
    of the same per-rank batches (same seed), and evaluate it. Sends ``numel x 4`` bytes a step."""
    from torch.nn.parallel import DistributedDataParallel

    from .data import ShardedData, evaluate, forward
    from .schedule import set_lr
    from .trainer import build_optimizer

    cfg, device = trainer.cfg, trainer.device
    model = copy.deepcopy(model).to(device).train()
    data = ShardedData(trainer.task, trainer.rank, trainer.world, batch_size=cfg.batch_size,
                       eval_batch_size=cfg.eval_batch_size, seed=cfg.seed, device=device, num_workers=cfg.num_workers)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt, base_lr = build_optimizer(cfg.optim, model)
    base_lr = float(lr) if lr is not None else base_lr
    for step in range(trainer.schedule.steps):
        set_lr(opt, base_lr * trainer.lr_schedule.factor(step))
        inputs, targets = data.next_batch()
        trainer.task.loss_fn(forward(ddp, inputs), targets).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    res = evaluate(model, data.test_loader, trainer.task.loss_fn, device)
    per_step = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {**res, "bytes_sent": per_step * trainer.schedule.steps, "lr": base_lr}


def run_outputs(trainer) -> dict[str, Any]:
    """Summary fields of the end of a run (collective: every rank calls it, all get the same):
    the L0 phase's bytes (diff pruning), the task diff (masked runs, ``save_diff``; rank 0 writes
    it) and the width core evaluated alone (``mask=width_core``)."""
    out: dict[str, Any] = {}
    if trainer.l0 is not None:
        out.update(trainer.l0.summary())
    if trainer.task_diff is not None and trainer.cfg.get("save_diff", True):
        out.update(trainer.task_diff.write(trainer.model, trainer.run_dir))
        if out.get("task_diff_skipped"):
            trainer.log.info(f"task diff not written: {out['task_diff_skipped']}")
    if trainer.cfg.mask.name == "width_core":
        out.update(width_core_report(trainer, trainer.initial_core))
    return out


def summary_lines(s: Mapping[str, Any]) -> list[str]:
    """Lines of the end-of-run report for the fields above (empty when none applies)."""
    from .metrics import human_bytes

    lines = []
    if s.get("l0_steps"):
        per = s["l0_bytes_sent"] / s["l0_steps"]
        lines.append(f"  L0 phase         {human_bytes(s['l0_bytes_sent'])} in {s['l0_steps']} steps "
                     f"({human_bytes(per)}/step: w + log_alpha gradients, dense; counted above)")
    if "task_diff_bytes" in s:
        lines.append(f"  task diff        {human_bytes(s['task_diff_bytes'])} ({s['task_diff_entries']:,} entries) vs "
                     f"full model {human_bytes(s['full_model_bytes'])} (ratio {s['task_diff_ratio']:.4f}); "
                     f"base: {s['task_diff_base']}")
    elif s.get("task_diff_skipped"):
        lines.append(f"  task diff        not written: {s['task_diff_skipped']}")
    if "core_acc" in s:
        lines.append(f"  width core       {s['core_acc']:.4f} test accuracy (exported, evaluated alone; "
                     f"{s['core_numel']:,} parameters)")
    if "core_alone_acc" in s:
        lines.append(f"  core alone       {s['core_alone_acc']:.4f} test accuracy (same core trained alone, "
                     f"same steps, lr {s['core_alone_lr']:g})")
    return lines
