"""``mask=lottery``: lottery-ticket sparse fine-tuning (Ansell et al., ACL 2022, LT-SFT).

The first ``mask.dense_steps`` steps (after ``schedule.dense_steps``) fine-tune every weight
with plain dense all-reduces (``n x 4`` bytes a step, counted in the run's bytes like any dense
step); the mask is then the k entries that moved most, ``|theta - theta_0|``
(:func:`sparsecomm.change_mask.change_mask`: every rank holds the same weights after DDP, so
choosing sends nothing but the digest check), and with ``mask.rewind=true`` the weights go back
to ``theta_0`` before the k entries alone are trained. Memory: one float32 CPU copy of the
initial weights, held until the mask is chosen.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from sparsecomm.change_mask import change_mask, rewind, snapshot
from sparsecomm.mask import Mask

from ..config import ConfigError
from ..fields import whole_number
from ..schedule import Schedule
from .base import Change, DensityKind, Setting, View


class LotteryKind(DensityKind):
    name = "lottery"

    def __init__(self, cfg: Mapping, setting: Setting):
        super().__init__(cfg, setting)
        self.dense_steps = whole_number(cfg.dense_steps, "mask.dense_steps", 1, ConfigError)
        self.initial: dict[str, torch.Tensor] | None = snapshot(setting.model)

    def plan(self, schedule: Schedule) -> Schedule:
        if schedule.refresh_every:
            raise ConfigError(f"mask=lottery chooses its mask once, after its dense phase, but "
                              f"schedule.refresh_every={schedule.refresh_every}: use schedule=fish_fixed or "
                              f"schedule=dense_warmup")
        if schedule.dense_steps + self.dense_steps >= schedule.steps:
            raise ConfigError(f"mask.dense_steps={self.dense_steps} (+ schedule.dense_steps={schedule.dense_steps}) "
                              f"leaves no sparse step of steps={schedule.steps}; lower mask.dense_steps")
        return dataclasses.replace(schedule, dense_steps=schedule.dense_steps + self.dense_steps)

    def build(self, model: torch.nn.Module) -> Mask:
        if self.initial is None:
            raise ConfigError("mask=lottery chooses its mask once; its initial weights are gone (refresh is not "
                              "supported)")
        return change_mask(model, self.initial, density=self.cfg.density, always=self.always)

    def new_mask(self, view: View) -> Change:
        """The mask; with ``mask.rewind`` the weights go back to their start in place (every rank
        alike, so DDP's replicas stay equal), which the task diff then takes as its base."""
        mask = self.next_mask(view.model)
        lines = []
        if bool(self.cfg.rewind):
            rewind(view.model, self.initial)
            lines.append(f"step {view.step}: lottery mask chosen by the change of {self.dense_steps} dense steps; "
                         f"weights rewound to their start")
        self.initial = None  # 4 bytes per entry freed
        return Change(mask=mask, base=view.model, lines=lines)
