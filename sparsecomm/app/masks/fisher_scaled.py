"""``mask=fisher_scaled``: FISH with the activation scale taken out of the Linear weights' scores.

Each rank scores its shard as ``mask=fisher`` does; before the exchange every Linear weight's
score is rescaled by :func:`sparsecomm.score_scaling.normalise_scores` (``mask.normalise``:
``activation``, the default, divides column j by channel j's mean squared input activation,
measured on the same examples by one forward pass; ``rows_and_columns`` flattens the score's
input- and output-channel totals, ``columns`` the input side only). Measured on MiniLM at 0.5%
(``benchmarks/results/fine_tuning_placement.md``, ``fine_tuning.md``): FISH puts 27.8% of its
residual-stream entries on 8 of 384 channels, ``activation`` 12.3%, ``columns`` 4.7%,
``rows_and_columns`` 2.7% (a uniform spread: 2.1%); yet on WordNet (seed 0, lr 3e-3)
``activation`` reached 0.770 and ``rows_and_columns`` 0.732: an even spread is not what makes
a mask train well. On the wire: the score exchange of ``mask=fisher`` plus one float64 all-reduce of
the activation sums (``8 x (in + 1)`` bytes per Linear) or of the channel totals (``8 x (in + out)``; under 0.4 MB for MiniLM),
all counted in ``score_bytes``.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from sparsecomm.score_scaling import NORMALISATIONS, input_activation_scales, linear_weights, normalise_scores
from sparsecomm.topk import _ring_allreduce_bytes

from ..config import ConfigError
from .base import Setting
from .fisher import FisherKind


class FisherScaledKind(FisherKind):
    name = "fisher_scaled"

    def __init__(self, cfg: Mapping, setting: Setting):
        super().__init__(cfg, setting)
        self.normalise = str(cfg.normalise)
        if self.normalise not in NORMALISATIONS:
            raise ConfigError(f"mask.normalise={self.normalise!r} is not a score normalisation; use one of "
                              f"{', '.join(NORMALISATIONS)}")
        if self.normalise != "none" and not linear_weights(setting.model):
            raise ConfigError(f"mask.normalise={self.normalise} rescales nn.Linear weights and this model has none; "
                              f"use mask.normalise=none (plain FISH) or mask=fisher")

    def transform(self, model: torch.nn.Module):
        how = self.normalise
        if how == "none":
            return None
        scales = None
        if how == "activation":
            world = self.setting.data.world
            share = int(self.cfg.num_samples) // world + (1 if self.setting.data.rank < int(self.cfg.num_samples) % world
                                                          else 0)
            scales = input_activation_scales(
                model, self.setting.data.fisher_batches(self.rounds, int(self.cfg.batch_size)), num_samples=share)
            numel = sum(s.numel() + 1 for s in scales.values())
        else:
            numel = sum(sum(m.weight.shape) for m in linear_weights(model).values())
        self.score_bytes += _ring_allreduce_bytes(numel, self.setting.data.world)

        def rescale(scores: dict[str, torch.Tensor]) -> None:
            normalise_scores(scores, model, how, activation_scales=scales)
        return rescale
