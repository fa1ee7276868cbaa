"""``mask=fisher``: the FISH mask (Sung et al., 2021), scored by every rank on its own shard.

Choosing it sends the exchange of Fisher scores that :func:`sparsecomm.fisher.fisher_mask`
documents (by default the exact candidate exchange of :func:`sparsecomm.topk.sum_topk`: a few
MB instead of 8 bytes per ranked entry; counted per rank as ``score_bytes``); training then
sends the k selected gradient entries a step.
"""
from __future__ import annotations

import torch

from sparsecomm.fisher import fisher_mask
from sparsecomm.mask import Mask
from sparsecomm.topk import NonFiniteScores

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
        exchange: dict = {}
        try:
            mask = fisher_mask(model, data, self.setting.task.loss_fn, density=self.scored_density(model),
                               num_samples=int(cfg.num_samples), method=cfg.method, always=self.always,
                               chunk_size=int(cfg.chunk_size), stats=exchange, transform=self.transform(model))
        except NonFiniteScores:
            raise ConfigError("the Fisher scores hold NaN (the model's gradients overflow: the dense steps diverged "
                              "or the weights are too large): lower optim.dense_lr, or shorten schedule.dense_steps"
                              ) from None
        self.score_bytes += int(exchange.get("bytes_sent", 0))  # per rank, on the wire (sparsecomm.topk.sum_topk)
        return mask

    def scored_density(self, model: torch.nn.Module) -> float:
        """The density the Fisher ranking fills (a subclass may keep part of k for itself)."""
        return self.cfg.density

    def transform(self, model: torch.nn.Module):
        """``transform(scores)`` applied to this rank's scores before ranking, or None (plain FISH)."""
        return None
