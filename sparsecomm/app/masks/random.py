"""``mask=random``: k entries drawn uniformly (``always`` kept whole), the same on every rank
from the seed; a new draw (seed + round) at each refresh. Choosing it sends nothing."""
from __future__ import annotations

import torch

from sparsecomm.mask import Mask, random_mask

from .base import DensityKind


class RandomKind(DensityKind):
    name = "random"

    def build(self, model: torch.nn.Module) -> Mask:
        seed = int(self.cfg.seed) + self.rounds
        return random_mask(model, density=self.cfg.density, seed=seed, always=self.always)
