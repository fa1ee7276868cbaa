"""The run's data: the task built from its config, each rank's shard, and test accuracy.

``build_task(cfg.task)`` instantiates ``task/`` (:mod:`sparsecomm.app.tasks`); :class:`ShardedData`
gives each rank a different shard of the training set (and of the test set) with a resumable
position; :func:`evaluate` computes test accuracy with one all-reduce of 3 float64 numbers.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils._pytree import tree_map
from torch.utils.data import DataLoader, DistributedSampler, Subset

from sparsecomm import distributed as sdist
from sparsecomm.modelio import forward, logits_of
from .batching import LengthGroupedBatches
from .config import ConfigError


def to_device(batch: Any, device: torch.device) -> Any:
    return tree_map(lambda t: t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t, batch)


class ShardedData:
    """This rank's data: a different shard of the training set per rank, and of the test set.

    Training batches come from a ``DistributedSampler`` (reshuffled every epoch, seed shared by
    the ranks, so shards never overlap within an epoch); the stream is endless and knows its
    position (``epoch``, ``batch``) for checkpoints. The loader's workers (``num_workers > 0``)
    are seeded from (seed, rank, epoch), not from the process's RNG, so a resumed stream's
    workers draw what the uninterrupted stream's drew (random augmentation in a worker).
    """

    def __init__(self, task, rank: int, world: int, *, batch_size: int, eval_batch_size: int, seed: int,
                 device: torch.device, num_workers: int = 0):
        self.task, self.rank, self.world, self.seed, self.device = task, rank, world, seed, device
        self.sampler = DistributedSampler(task.train_set, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        shard = len(self.sampler)
        if shard < batch_size:
            raise ConfigError(
                f"batch_size={batch_size} is larger than this rank's shard of {shard} training examples "
                f"({len(task.train_set)} over {world} ranks); lower batch_size")
        pin = device.type == "cuda"
        self._worker_seeds = torch.Generator()  # the workers' base seed, drawn once per epoch
        if getattr(task, "lengths", None) is not None:  # padded per batch: group similar lengths
            self.sampler = LengthGroupedBatches(self.sampler, task.lengths, batch_size, seed=seed)
            self.train_loader = DataLoader(task.train_set, batch_sampler=self.sampler, collate_fn=task.collate_fn,
                                           num_workers=num_workers, pin_memory=pin, generator=self._worker_seeds)
        else:
            self.train_loader = DataLoader(task.train_set, batch_size=batch_size, sampler=self.sampler,
                                           drop_last=True, collate_fn=task.collate_fn, num_workers=num_workers,
                                           pin_memory=pin, generator=self._worker_seeds)
        test_slice = Subset(task.test_set, range(rank, len(task.test_set), world))  # no padding: exact counts
        # its own generator: each pass over a loader draws a base seed, from torch's global stream
        # without one, and evaluating would then change the dropout the next training steps draw
        self.test_loader = DataLoader(test_slice, batch_size=eval_batch_size, shuffle=False,
                                      collate_fn=task.collate_fn, num_workers=num_workers, pin_memory=pin,
                                      generator=torch.Generator())
        self.epoch, self.batch = 0, 0
        self._it: Iterator | None = None

    def next_batch(self) -> tuple[Any, Any]:
        while True:
            if self._it is None:
                self.sampler.set_epoch(self.epoch)
                self._worker_seeds.manual_seed(((self.seed * 1_000_003 + self.epoch) * 4099 + self.rank) % (1 << 63))
                self._it = iter(self.train_loader)
            try:
                inputs, targets = next(self._it)
                self.batch += 1
                return to_device(inputs, self.device), to_device(targets, self.device)
            except StopIteration:
                self._it, self.epoch, self.batch = None, self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Resume the stream: same epoch, skipping the batches already trained on."""
        self.epoch, self._it, self.batch = int(state["epoch"]), None, 0
        for _ in range(int(state["batch"])):
            self.next_batch()

    def fisher_batches(self, round_: int, batch_size: int) -> Iterator[tuple[Any, Any]]:
        """This rank's own shard, in an order that changes with ``round_`` (one per mask)."""
        sampler = DistributedSampler(self.task.train_set, num_replicas=self.world, rank=self.rank, shuffle=True,
                                     seed=self.seed + 7919 * (round_ + 1))
        loader = DataLoader(self.task.train_set, batch_size=batch_size, sampler=sampler,
                            collate_fn=self.task.collate_fn)
        for inputs, targets in loader:
            yield to_device(inputs, self.device), to_device(targets, self.device)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, loss_fn, device: torch.device) -> dict[str, float]:
    """Accuracy and mean loss over the test set: each rank its slice, one all-reduce of 3 float64."""
    was_training = model.training
    model.eval()
    stats = torch.zeros(3, dtype=torch.float64, device=device)  # correct, examples, summed loss
    for inputs, targets in loader:
        inputs, targets = to_device(inputs, device), to_device(targets, device)
        outputs = forward(model, inputs)
        n = targets.shape[0]
        stats[0] += (logits_of(outputs).argmax(-1) == targets).sum()
        stats[1] += n
        stats[2] += loss_fn(outputs, targets).double() * n
    model.train(was_training)
    if sdist.is_initialized():
        dist.all_reduce(stats)
    correct, count, loss = stats.tolist()
    return {"test_acc": correct / max(count, 1), "test_loss": loss / max(count, 1), "test_examples": int(count)}


def build_data(task, cfg: Mapping, device: torch.device) -> ShardedData:
    """This rank's :class:`ShardedData` of ``task`` per the run's config (batch sizes, seed, workers)."""
    return ShardedData(task, sdist.rank(), sdist.world_size(), batch_size=cfg.batch_size,
                       eval_batch_size=cfg.eval_batch_size, seed=cfg.seed, device=device, num_workers=cfg.num_workers)


def evaluate_run(model: torch.nn.Module, data: ShardedData, loss_fn, device: torch.device,
                 rank0_buffers: bool) -> dict[str, float]:
    """:func:`evaluate` over every rank's test slice; ``rank0_buffers``: every rank first takes rank 0's
    module buffers (BatchNorm statistics, one broadcast of their bytes), those of the saved model:
    DDP broadcasts them before each training forward, not after the last one."""
    if rank0_buffers:
        for b in model.buffers():
            dist.broadcast(b, 0)
    return evaluate(model, data.test_loader, loss_fn, device)


def build_task(task_cfg: DictConfig):
    """``hydra.utils.instantiate(cfg.task)``, unwrapping Hydra's error to the task's own."""
    try:
        return instantiate(task_cfg, _convert_="all")
    except InstantiationException as e:
        if e.__cause__ is not None:
            raise e.__cause__ from None
        raise
