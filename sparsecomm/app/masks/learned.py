"""``mask=learned``: a mask that learns from training (dynamic sparse fine-tuning).

The first mask is ``mask=random``'s draw (``mask.seed``). During masked steps every rank sums
its squared LOCAL gradients per entry (:meth:`local_gradient`, fed by the trainer before DDP's
hook all-reduces the bucket, into :class:`sparsecomm.learned_mask.LocalGradientSquares`):
backward computes every entry's gradient anyway; nothing extra crosses the network, and the hook
still sends only the k masked ones. Every ``mask.refresh_every`` steps (it sets
``schedule.refresh_every``) :func:`sparsecomm.learned_mask.refresh_mask` re-chooses the global
top-k of the summed squares through the exact candidate exchange and swaps at most
``mask.max_change x k`` entries; the sums then start again. A squared gradient carries its
input's activation scale as a Fisher score does: ``mask.normalise`` (``columns`` or
``rows_and_columns``, :mod:`sparsecomm.score_scaling`; one all-reduce of the channel totals)
flattens it before ranking. The trainer moves the hook and the
masked optimizer's state to the new mask (``reset_mask``: entries that stay keep their state);
checkpoints hold every rank's sums and the current mask's positions, so a resumed run refreshes
exactly as an uninterrupted one.

On the wire per refresh: the candidate exchange (about 3-4 MB per rank for MiniLM at 0.5% on 2
ranks) and the scores of the swapped entries (8 bytes each), counted in ``score_bytes``; each
checkpoint gathers every rank's sums on rank 0 (``n x 4`` bytes per rank).
Memory: one float32 copy of the model (the sums); rank 0's checkpoints hold one per rank.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from sparsecomm.learned_mask import LocalGradientSquares, refresh_mask
from sparsecomm.mask import Mask, random_mask
from sparsecomm.score_scaling import normalise_scores

from ..config import ConfigError
from ..fields import whole_number
from ..schedule import Schedule
from .base import Change, DensityKind, Setting, View


class LearnedKind(DensityKind):
    name = "learned"
    wants_local_gradients = True

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
        self.normalise = str(cfg.normalise)
        if self.normalise not in ("none", "columns", "rows_and_columns"):
            raise ConfigError(f"mask.normalise={self.normalise!r} is not a normalisation of the learned mask's sums; "
                              f"use none, columns or rows_and_columns (activation needs a data pass: mask=fisher_scaled)")
        self.squares = LocalGradientSquares(setting.model)
        self.mask: Mask | None = None   # the mask in use (the last one this kind returned)
        self.swapped = 0                # entries grown (= dropped) over all refreshes
        self.wanted = 0                 # swaps the top-k asked for, before the limit

    def plan(self, schedule: Schedule) -> Schedule:
        if schedule.refresh_every not in (0, self.refresh_every):
            raise ConfigError(f"mask=learned refreshes every mask.refresh_every={self.refresh_every} steps, but "
                              f"schedule.refresh_every={schedule.refresh_every}: set one of them (or make them equal)")
        return dataclasses.replace(schedule, refresh_every=self.refresh_every)

    def build(self, model: torch.nn.Module) -> Mask:
        return random_mask(model, density=self.cfg.density, seed=int(self.cfg.seed), always=self.always)

    def new_mask(self, view: View) -> Change:
        if self.mask is None:
            self.mask = self.next_mask(view.model)
            return Change(mask=self.mask)
        squares = self.squares
        for s in squares.scores.values():  # a skipped non-finite step must not poison the ranking
            s.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        if self.normalise != "none":  # the sums of squared gradients carry the activation scale as FISH's do
            normalise_scores(squares.scores, view.model, self.normalise)
        stats: dict = {}
        self.mask = refresh_mask(self.mask, squares.scores, max_change=self.max_change, always=self.always, stats=stats)
        self.score_bytes += int(stats["bytes_sent"])
        self.swapped += int(stats["grown"])
        self.wanted += int(stats["wanted"])
        line = (f"step {view.step}: learned mask refreshed from {squares.passes} steps of local gradients: "
                f"{stats['grown']:,} of {self.k:,} entries swapped (top-k asked for {stats['wanted']:,}, "
                f"limit {stats['limit']:,})")
        record = {k: stats[k] for k in ("grown", "wanted", "limit", "bytes_sent")}
        squares.reset()
        self.rounds += 1
        return Change(mask=self.mask, lines=[line], records=[("mask_refresh", record)])

    def before_step(self, view: View) -> Change | None:
        self.squares.enabled = not view.dense
        self.squares.begin_pass()
        return None

    def local_gradient(self, name: str, grad: torch.Tensor) -> None:
        self.squares.add(name, grad)

    def after_step(self, view: View) -> Change | None:
        self.squares.enabled = False
        return None

    def outputs(self, view: View) -> Change:
        return Change(fields={"refreshes": max(self.rounds - 1, 0), "entries_swapped": self.swapped,
                              "swaps_wanted": self.wanted})

    @staticmethod
    def report_lines(summary: Mapping[str, Any]) -> list[str]:
        return [f"  learned mask     {summary.get('refreshes', 0)} refreshes, {summary.get('entries_swapped', 0):,} "
                f"entries swapped ({summary.get('swaps_wanted', 0):,} wanted)"]

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        positions = None if self.mask is None else {n: self.mask.flat_indices(n) for n in self.mask}
        sd.update(swapped=self.swapped, wanted=self.wanted, squares=self.squares.state_dict(), positions=positions)
        return sd

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        super().load_state_dict(sd)
        self.swapped, self.wanted = int(sd["swapped"]), int(sd["wanted"])
        if sd.get("squares") is not None:
            self.squares.load_state_dict(sd["squares"])
        self.mask = None
        if sd.get("positions") is not None:
            params = dict(self.setting.model.named_parameters())
            bits = {}
            for n, p in params.items():
                b = torch.zeros(p.numel(), dtype=torch.bool)
                b[sd["positions"][n]] = True
                bits[n] = b.reshape(p.shape)
            self.mask = Mask(bits)
