"""``mask=learned``: a mask that learns from training (dynamic sparse fine-tuning).

The first mask is ``mask=random``'s draw (``mask.seed``). During masked steps every rank sums
its squared LOCAL gradients per entry (:class:`sparsecomm.learned_mask.LocalGradientSquares`:
backward computes every entry's gradient anyway; nothing extra crosses the network, and the hook
still sends only the k masked ones). Every ``mask.refresh_every`` steps
(it sets ``schedule.refresh_every``) :func:`sparsecomm.learned_mask.refresh_mask` re-chooses the
global top-k of the summed squares through the exact candidate exchange and swaps at most
``mask.max_change x k`` entries; the sums then start again. The trainer moves the hook and the
masked optimizer's state to the new mask (``reset_mask``: entries that stay keep their state)
and checkpoints hold the sums, so a resumed run refreshes exactly as an uninterrupted one.

On the wire per refresh: the candidate exchange (about 3-4 MB per rank for MiniLM at 0.5% on 2
ranks) and the scores of the swapped entries (8 bytes each), counted in ``score_bytes``.
Memory: one float32 copy of the model (the sums), which checkpoints also hold.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from sparsecomm.learned_mask import LocalGradientSquares, refresh_mask
from sparsecomm.mask import Mask, check_fraction, random_mask

from ..config import ConfigError
from ..fields import whole_number
from ..schedule import Schedule
from .base import DensityKind, Setting


class LearnedKind(DensityKind):
    name = "learned"

    def __init__(self, cfg: Mapping, setting: Setting):
        super().__init__(cfg, setting)
        self.refresh_every = whole_number(cfg.refresh_every, "mask.refresh_every", 1, ConfigError)
        try:
            self.max_change = float(cfg.max_change)
            if not 0.0 <= self.max_change <= 1.0:
                raise ValueError
        except (TypeError, ValueError):
            raise ConfigError(f"mask.max_change={cfg.max_change!r} must be a fraction in [0, 1], the share of the "
                              f"k entries one refresh may swap, e.g. mask.max_change=0.1") from None
        self.squares: LocalGradientSquares | None = None
        self.swapped = 0          # entries grown (= dropped) over all refreshes
        self.wanted = 0           # swaps the top-k asked for, before the limit
        self._pending: Mapping[str, Any] | None = None  # loaded sums, applied once the model is known

    def plan(self, schedule: Schedule) -> Schedule:
        if schedule.refresh_every not in (0, self.refresh_every):
            raise ConfigError(f"mask=learned refreshes every mask.refresh_every={self.refresh_every} steps, but "
                              f"schedule.refresh_every={schedule.refresh_every}: set one of them (or make them equal)")
        return dataclasses.replace(schedule, refresh_every=self.refresh_every)

    def build(self, model: torch.nn.Module) -> Mask:
        return random_mask(model, density=self.cfg.density, seed=int(self.cfg.seed), always=self.always)

    def _sums(self, model: torch.nn.Module) -> LocalGradientSquares:
        if self.squares is None:
            self.squares = LocalGradientSquares(model).attach()
            if self._pending is not None:
                self.squares.load_state_dict(self._pending)
                self._pending = None
        return self.squares

    def new_mask(self, run, step: int) -> Mask:
        if self.rounds == 0:
            return self.next_mask(run.model)
        squares = self._sums(run.model)
        for s in squares.scores.values():  # a skipped non-finite step must not poison the ranking
            s.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        stats: dict = {}
        mask = refresh_mask(run.mask, squares.scores, max_change=self.max_change, always=self.always, stats=stats)
        self.score_bytes += int(stats["bytes_sent"])
        self.swapped += int(stats["grown"])
        self.wanted += int(stats["wanted"])
        run.log.info(f"step {step}: learned mask refreshed from {squares.passes} steps of local gradients: "
                     f"{stats['grown']:,} of {self.k:,} entries swapped (top-k asked for {stats['wanted']:,}, "
                     f"limit {stats['limit']:,})")
        squares.reset()
        self.rounds += 1
        return mask

    def before_step(self, run, step: int, dense: bool) -> None:
        squares = self._sums(run.model)
        squares.enabled = not dense
        squares.begin_pass()

    def after_step(self) -> None:
        if self.squares is not None:
            self.squares.enabled = False

    def outputs(self, run) -> dict[str, Any]:
        return {"refreshes": max(self.rounds - 1, 0), "entries_swapped": self.swapped,
                "swaps_wanted": self.wanted}

    @staticmethod
    def report_lines(summary: Mapping[str, Any]) -> list[str]:
        return [f"  learned mask     {summary.get('refreshes', 0)} refreshes, {summary.get('entries_swapped', 0):,} "
                f"entries swapped ({summary.get('swaps_wanted', 0):,} wanted)"]

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd.update(swapped=self.swapped, wanted=self.wanted,
                  squares=self.squares.state_dict() if self.squares is not None else self._pending)
        return sd

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        super().load_state_dict(sd)
        self.swapped, self.wanted = int(sd["swapped"]), int(sd["wanted"])
        if sd.get("squares") is not None:
            if self.squares is not None:
                self.squares.load_state_dict(sd["squares"])
            else:
                self._pending = sd["squares"]
