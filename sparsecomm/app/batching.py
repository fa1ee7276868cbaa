"""Batches of examples of similar length, for tasks whose batches are padded to their longest example.

:class:`LengthGroupedBatches` wraps a sampler (e.g. each rank's ``DistributedSampler``): it takes
the sampler's indices of an epoch in order, cuts them into windows of ``window`` batches, sorts
each window by example length, cuts it into batches and shuffles the batches of the epoch with a
generator seeded by ``(seed, epoch)``. Every example still appears once per epoch, the batches'
order stays random, and a batch's padding shrinks to the spread of lengths inside one window.
Deterministic given the sampler's order and the epoch, so a resumed stream replays the same
batches. Nothing crosses the network.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class LengthGroupedBatches(Sampler[list[int]]):
    """Batch sampler: lists of ``batch_size`` indices of similar ``lengths[i]``.

    Args:
        sampler: yields this rank's indices for the epoch (its ``epoch`` attribute, if any, seeds
            the batch shuffle; ``set_epoch`` is forwarded).
        lengths: length (e.g. tokens) of every example of the dataset, indexed like it.
        batch_size: examples per batch; drop_last: drop the epoch's last short batch.
        window: batches per sorting window (larger: less padding, less randomness).
    """

    def __init__(self, sampler, lengths: Sequence[int], batch_size: int, *, drop_last: bool = True,
                 window: int = 50, seed: int = 0):
        if batch_size < 1 or window < 1:
            raise ValueError(f"batch_size={batch_size} and window={window} must be >= 1")
        self.sampler, self.lengths, self.batch_size = sampler, lengths, batch_size
        self.drop_last, self.window, self.seed = drop_last, window, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = list(self.sampler)
        if self.drop_last:
            order = order[:len(order) - len(order) % self.batch_size]
        span = self.window * self.batch_size
        batches = []
        for s in range(0, len(order), span):
            chunk = sorted(order[s:s + span], key=lambda i: self.lengths[i])
            batches += [chunk[b:b + self.batch_size] for b in range(0, len(chunk), self.batch_size)]
        epoch = getattr(self.sampler, "epoch", self.epoch)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        for j in torch.randperm(len(batches), generator=gen).tolist():
            yield batches[j]
