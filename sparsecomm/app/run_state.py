"""What a trainer's checkpoint holds: its components, each with ``state_dict``/``load_state_dict``.

As in torchtitan, the trainer hands its stateful parts by name to the
:class:`~sparsecomm.app.checkpointing.CheckpointManager` (:func:`components`); a checkpoint is a
small header plus ``{name: component.state_dict()}``, and resuming loads them in this order::

    model       the model's full state dict (weights and buffers: rank 0's)
    buffers     the module buffers (BatchNorm statistics) of every other rank where they differ
                from rank 0's (all-gathered: a collective); another world size keeps rank 0's
    dense_opt   the dense optimizer (warm-up, full steps, mask=dense)
    mask        the mask's bits and its digest: the one copy of the digest in a checkpoint
                (loading checks it, checks the mask fits the model and hands it to the hook and
                to a new masked optimizer)
    sparse_opt  the masked optimizer (its state follows the mask's index layout)
    sync        the gradient sync's counters (hook steps, bytes sent, dense bytes)
    mask_kind   the mask kind's own state (rounds, Fisher score bytes; diff pruning's L0 phase)
    progress    the data position, EVERY rank's RNG states and loss window (all-gathered: a
                collective), the last log mark; another world size re-shards instead
    nonfinite   skipped-step counters
    task_diff   the task diff's base weights and the union of the masks so far (masked runs)

The header (:class:`~sparsecomm.app.checkpointing.TrainingHeader`): format, step, world size, the
training config and its hash, the model's tensor names and shapes. Rank 0 writes the file; nothing
else crosses the network but the all-gathers of the per-rank buffers and RNG states (world x their
bytes, once per checkpoint). A checkpoint without ``buffers`` loads: every rank then starts from
rank 0's buffers (:func:`resume_notes` says so).

Exactness: on the same world size a resumed run continues the uninterrupted one bit for bit on
2 ranks (masks, weights, buffers). On 3 or more ranks the first step after the resume reduces in
the bucket layout a new DDP starts with, while the uninterrupted run has rebuilt its buckets in
gradient-ready order after its first step; Gloo sums an entry in an order that depends on its
position in the reduced tensor, so the weights may differ in their last bits from there
(measured: 4e-9 after 3 steps on 4 ranks, the same masks).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from sparsecomm import distributed as sdist
from sparsecomm.checkpoint import rng_state, set_rng_state
from sparsecomm.mask import Mask
from .checkpointing import Stateful


class Attr:
    """The component held in ``owner.<name>`` now (the model and optimizers are swapped during a
    diff-pruning run); None there saves None and loads nothing. ``cpu``: copy tensors to the CPU."""

    def __init__(self, owner: Any, name: str, *, cpu: bool = False):
        self.owner, self.name, self.cpu = owner, name, cpu

    def state_dict(self) -> dict[str, Any] | None:
        obj = getattr(self.owner, self.name)
        if obj is None:
            return None
        sd = obj.state_dict()
        return {k: v.detach().cpu().clone() for k, v in sd.items()} if self.cpu else sd

    def load_state_dict(self, sd: Mapping[str, Any] | None) -> None:
        obj = getattr(self.owner, self.name)
        if sd is not None and obj is not None:
            obj.load_state_dict(sd)


class RankBuffers:
    """Each rank's own module buffers (BatchNorm running statistics), saved per rank.

    Between DDP's broadcasts of rank 0's buffers (before each training forward) every rank's
    buffers move with its own batch, and with ``comm.sync_buffers=false`` they never meet: what
    an eval-mode pass reads (the Fisher mask's scoring, the width core's export) is per rank.
    The model's state holds rank 0's; this component holds, for every other rank, the buffers
    that differ from rank 0's (nothing when they agree). Saving all-gathers every rank's
    persistent buffers (world x their bytes, once per checkpoint). Same world size: each rank
    gets its own back. Another world size: every rank keeps rank 0's.
    """

    def __init__(self, get_model: Callable[[], torch.nn.Module]):
        self.get_model = get_model

    def current(self) -> dict[str, torch.Tensor]:
        model = self.get_model()
        saved = model.state_dict(keep_vars=True)
        return {n: b for n, b in model.named_buffers() if n in saved}

    def state_dict(self) -> dict[str, Any]:
        mine = {n: b.detach().cpu().clone() for n, b in self.current().items()}
        ranks = [mine]
        if sdist.is_initialized() and sdist.world_size() > 1:
            ranks = [None] * sdist.world_size()
            dist.all_gather_object(ranks, mine)
        first = ranks[0]
        return {"ranks": [{} if r == 0 else {n: t for n, t in own.items() if not torch.equal(t, first[n])}
                          for r, own in enumerate(ranks)]}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        ranks = sd["ranks"]
        if len(ranks) != sdist.world_size():
            return
        buffers = self.current()
        with torch.no_grad():
            for name, value in ranks[sdist.rank()].items():
                buffers[name].copy_(value)


class Progress:
    """Where each rank is: data position, RNG states, loss window, last log mark.

    Same world size: each rank gets its own back, so the run continues bit for bit. Another
    world size: the data is re-sharded at the same epoch and example count and the RNG reseeded
    from (seed, step, rank); ``resharded`` then says so.
    """

    def __init__(self, data, batch_size: int, monitor, seed: int, get_step: Callable[[], int],
                 get_bytes_sent: Callable[[], int]):
        """``monitor``: the :class:`~sparsecomm.app.monitor.TrainMonitor` (its loss window and log mark)."""
        self.data, self.batch_size, self.monitor, self.seed = data, batch_size, monitor, seed
        self.get_step, self.get_bytes_sent = get_step, get_bytes_sent
        self.resharded: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        mine = {"rng": rng_state(), "window": self.monitor.window.detach().cpu().clone()}
        ranks = [mine]
        if sdist.is_initialized() and sdist.world_size() > 1:
            ranks = [None] * sdist.world_size()
            dist.all_gather_object(ranks, mine)
        return {"data": self.data.state_dict(), "batch_size": self.batch_size, "ranks": ranks,
                "log_mark": list(self.monitor.mark)}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        rank, world = sdist.rank(), sdist.world_size()
        saved_world = len(sd["ranks"])
        if saved_world == world:
            self.data.load_state_dict(sd["data"])  # replays this epoch's batches (consumes RNG: restore after)
            set_rng_state(sd["ranks"][rank]["rng"])
            self.monitor.window.copy_(sd["ranks"][rank]["window"])
            self.monitor.mark = tuple(int(v) for v in sd["log_mark"])
            self.resharded = None
            return
        data, step = sd["data"], self.get_step()
        examples = int(data["batch"]) * int(sd["batch_size"]) * saved_world  # this epoch, all ranks
        batch = examples // (self.batch_size * world)
        self.data.load_state_dict({"epoch": int(data["epoch"]), "batch": min(batch, len(self.data.train_loader))})
        torch.manual_seed(self.seed + 1 + rank + 1_000_003 * step)
        self.monitor.window.zero_()
        self.monitor.mark = (step, self.get_bytes_sent())
        self.resharded = {"saved_world": saved_world, "epoch": int(data["epoch"]), "examples": examples}


class MaskState:
    """The run's mask: its bits and digest; loading checks the digest and hands the mask on
    (``adopt``: the trainer gives it to the hook, collectively, and builds the masked optimizer)."""

    def __init__(self, get: Callable[[], Mask | None], adopt: Callable[[Mask], None]):
        self.get, self.adopt = get, adopt

    def state_dict(self) -> dict[str, Any] | None:
        mask = self.get()
        return None if mask is None else {"bits": {n: mask[n] for n in mask}, "digest": mask.digest()}

    def load_state_dict(self, sd: Mapping[str, Any] | None) -> None:
        if sd is None:
            return
        mask = Mask(sd["bits"])
        if mask.digest() != sd["digest"]:
            raise ValueError("its mask does not match its stored digest")
        self.adopt(mask)


class WithoutDigest:
    """A masked optimizer's state without its mask digest (the checkpoint's ``mask`` holds it once)."""

    def __init__(self, part: Stateful):
        self.part = part

    def state_dict(self) -> dict[str, Any] | None:
        sd = self.part.state_dict()
        return None if sd is None else {k: v for k, v in sd.items() if k != "mask_digest"}

    def load_state_dict(self, sd: Mapping[str, Any] | None) -> None:
        self.part.load_state_dict(sd)


def components(owner: Any, *, buffers: RankBuffers, mask: MaskState, kind: Stateful, progress: Progress,
               nonfinite: Stateful, task_diff: Stateful | None) -> dict[str, Stateful]:
    """The trainer's checkpoint components in load order (the module doc). ``owner`` holds the parts
    that get swapped during a run (``model``, ``dense_opt``, ``sparse_opt``, ``sync``)."""
    parts: dict[str, Stateful] = {
        "model": Attr(owner, "model", cpu=True), "buffers": buffers, "dense_opt": Attr(owner, "dense_opt"),
        "mask": mask, "sparse_opt": WithoutDigest(Attr(owner, "sparse_opt")), "sync": Attr(owner, "sync"),
        "mask_kind": kind, "progress": progress, "nonfinite": nonfinite}
    if task_diff is not None:
        parts["task_diff"] = task_diff
    return parts


def resume_notes(header: Mapping[str, Any], progress: Progress, buffers: RankBuffers) -> list[str]:
    """What a loaded checkpoint does not carry over exactly, one log line each (none: bit for bit).

    ``header``: the checkpoint's, as :meth:`~sparsecomm.app.checkpointing.CheckpointManager.resume`
    returns it (``components``: the names it holds)."""
    moved = progress.resharded
    if moved is not None:
        return [f"resuming a {moved['saved_world']}-rank checkpoint on {sdist.world_size()} ranks: the mask and the "
                f"optimizer state are global and carry over; the data is re-sharded (epoch {moved['epoch']}, "
                f"~{moved['examples']} examples in), the RNG reseeded and every rank starts from rank 0's module "
                f"buffers (BatchNorm statistics), so this run is not bit-identical to an uninterrupted one"]
    if "buffers" not in header["components"] and sdist.world_size() > 1 and buffers.current():
        return ["the checkpoint holds rank 0's module buffers (BatchNorm statistics) only, so every rank starts "
                "from them: a mask chosen before the next training step may differ from the uninterrupted run's"]
    return []
