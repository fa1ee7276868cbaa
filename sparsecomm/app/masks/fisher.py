"""``mask=fisher``: the FISH mask (Sung et al., 2021), scored by every rank on its own shard.

Choosing it sends the exchange of Fisher scores that :func:`sparsecomm.fisher.fisher_mask`
documents (counted as ``score_bytes``: 8 bytes per ranked entry, all but ``always``); training
then sends the k selected gradient entries a step.
"""
from __future__ import annotations

import torch

from sparsecomm import distributed as sdist
from sparsecomm.fisher import fisher_mask
from sparsecomm.mask import Mask, matches_any

from ..config import ConfigError
from .base import DensityKind


class FisherKind(DensityKind):
    name = "fisher"

    def build(self, model: torch.nn.Module) -> Mask:
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise ConfigError("the model's weights hold NaN/Inf before its Fisher mask (the dense steps diverged): "
                              "lower optim.dense_lr, or shorten schedule.dense_steps")
        cfg = self.cfg
        data = self.setting.data.fisher_batches(self.rounds, int(cfg.batch_size))
        mask = fisher_mask(model, data, self.setting.task.loss_fn, density=cfg.density,
                           num_samples=int(cfg.num_samples), method=cfg.method, always=self.always,
                           chunk_size=int(cfg.chunk_size))
        if sdist.world_size() > 1:  # float64 sums of the trainable scores not kept whole (sparsecomm.fisher)
            self.score_bytes += 8 * sum(p.numel() for n, p in model.named_parameters()
                                        if p.requires_grad and not matches_any(n, self.always))
        return mask
