"""``mask=diff_pruning``: learn the mask as a sparse task diff (Guo, Rush & Kim, 2021).

After ``schedule.dense_steps`` warm-up steps, an L0 phase of ``mask.l0_steps`` steps trains a
:class:`~sparsecomm.diff_pruning.DiffPruning` wrapper of the model (base frozen; ``w`` at
``optim.dense_lr``, the gates' ``log_alpha`` at ``mask.alpha_lr``) on ``loss + l0_penalty x
E[L0]``; then the learned diff is projected to exactly ``mask.density`` (one global threshold,
``always`` kept whole) and the plain model ``base + masked diff`` fine-tunes with that mask fixed.

What travels, per step and rank: in the L0 phase the gradients of every ``w`` AND every
``log_alpha`` entry, ``(2n - #ungated head entries) x 4`` bytes (+ 4 per tensor when
structured), about twice dense DDP, counted in ``bytes_sent`` and apart as ``l0_bytes_sent``
(``dense_bytes`` counts dense DDP of the plain model, ``n x 4``, so the ratio stays honest);
afterwards ``k x 4``, as FISH.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from sparsecomm.diff_pruning import DiffPruning

from ..metrics import human_bytes
from ..optimizers import dense_optimizer
from ..schedule import Schedule
from .base import Change, DensityKind, Setting, View


class DiffPruningKind(DensityKind):
    name = "diff_pruning"

    def __init__(self, cfg: Mapping, setting: Setting):
        super().__init__(cfg, setting)
        self.l0_steps = int(cfg.l0_steps)
        self.start = 0               # the L0 phase's first step (set by plan)
        self.wrapper: DiffPruning | None = None
        self.bytes_sent = 0          # what the L0 phase handed to all-reduce (w + log_alpha gradients)
        self._sent0 = 0
        self.stats: dict[str, Any] = {}

    @property
    def active(self) -> bool:
        return self.wrapper is not None

    def plan(self, schedule: Schedule) -> Schedule:
        """The L0 phase is part of the dense phase: it follows the warm-up, and the mask is
        projected before step ``dense_steps + l0_steps`` (core/full cycles count from there)."""
        self.start = schedule.dense_steps
        return dataclasses.replace(schedule, dense_steps=schedule.dense_steps + self.l0_steps)

    def before_step(self, view: View) -> Change | None:
        if view.step == self.start and not self.active:
            return self.enter(view)
        return None

    def before_load(self, view: View) -> Change | None:
        """A checkpoint taken inside the L0 phase holds the wrapper as the model: enter it first. The
        phase trains steps ``start .. start + l0_steps - 1``, so it holds the wrapper after step
        ``start`` (a checkpoint of step ``start`` was taken before the phase) up to and including
        ``start + l0_steps`` (the mask is projected right after that checkpoint)."""
        if self.start < view.step <= self.start + self.l0_steps and not self.active:
            return self.enter(dataclasses.replace(view, step=self.start))
        return None

    def enter(self, view: View) -> Change:
        """Freeze the model as the base (also the task diff's) and train its wrapper from now on:
        a new DDP and hook (the counters go on), dense bytes counted as the plain model's."""
        cfg = self.cfg
        self._sent0 = view.bytes_sent
        w = DiffPruning(view.model, structured=bool(cfg.structured), stretch=tuple(cfg.stretch),
                        log_alpha_init=float(cfg.log_alpha_init), temperature=float(cfg.temperature),
                        ungated=self.setting.task.head if cfg.ungated_head else ())
        w.train(view.model.training)
        self.wrapper = w
        return Change(base=view.model, model=w, optimizer=self._optimizer(self.setting.optim),
                      dense_bytes_per_step=view.grad_bytes,
                      lines=[f"step {view.step}: diff pruning L0 phase for {self.l0_steps} steps: base frozen, "
                             f"{w.comm_numel:,} gradient entries (w + log_alpha) all-reduced per step"])

    def _optimizer(self, optim: Mapping) -> tuple[torch.optim.Optimizer, float]:
        """torch's AdamW/SGD with two groups: ``w`` at ``optim.dense_lr`` (``optim.weight_decay``),
        the gates at ``mask.alpha_lr`` (no decay; ``lr_scale`` keeps the ratio under the lr schedule)."""
        w = self.wrapper
        lr, alpha_lr = float(optim.dense_lr), float(self.cfg.alpha_lr)
        gates = list(w.log_alpha) + ([w.group_log_alpha] if w.group_log_alpha is not None else [])
        groups = [{"params": list(w.diff)}]
        if gates:
            groups.append({"params": gates, "lr": alpha_lr, "weight_decay": 0.0, "lr_scale": alpha_lr / lr})
        return dense_optimizer(optim, groups, lr), lr

    def extra_loss(self) -> torch.Tensor | None:
        """``l0_penalty x E[L0]`` during the L0 phase (the same on every rank)."""
        return float(self.cfg.l0_penalty) * self.wrapper.expected_l0() if self.active else None

    @torch.no_grad()
    def new_mask(self, view: View) -> Change:
        """Project the learned diff to the mask and hand ``base + mask x diff`` to the fixed-mask
        phase (with ``optim/``'s dense optimizer). Identical on every rank (same ``w`` and
        ``log_alpha`` after averaged updates; ties broken by position); the trainer checks the
        digests agree."""
        w = self.wrapper
        mask = w.project(float(self.cfg.density), always=list(self.always), field="mask.density")
        model = w.materialize(mask)
        model.train(w.training)
        self.bytes_sent = view.bytes_sent - self._sent0
        self.stats = {"l0_expected_l0": float(w.expected_l0()), "l0_gates_open": w.nonzero_fraction(),
                      "l0_comm_numel": w.comm_numel}
        self.wrapper = None
        self.rounds += 1
        s = self._fields()
        return Change(mask=mask, model=model, records=[("l0", s)], lines=[
            f"step {view.step}: L0 phase done ({human_bytes(s['l0_bytes_sent'])} sent), E[L0] "
            f"{s['l0_expected_l0']:.4g}, gates open {s['l0_gates_open']:.4f}; projected to the mask below"])

    def outputs(self, view: View) -> Change:
        return Change(fields=self._fields())

    def _fields(self) -> dict[str, Any]:
        return {"l0_steps": self.l0_steps, "l0_bytes_sent": self.bytes_sent, **self.stats}

    @staticmethod
    def report_lines(s: Mapping[str, Any]) -> list[str]:
        if not s.get("l0_steps"):
            return []
        per = s["l0_bytes_sent"] / s["l0_steps"]
        return [f"  L0 phase         {human_bytes(s['l0_bytes_sent'])} in {s['l0_steps']} steps "
                f"({human_bytes(per)}/step: w + log_alpha gradients, dense; counted above)"]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "bytes_sent": self.bytes_sent, "sent0": self._sent0, "stats": dict(self.stats)}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        super().load_state_dict(sd)
        self.bytes_sent, self._sent0, self.stats = int(sd["bytes_sent"]), int(sd["sent0"]), dict(sd["stats"])
