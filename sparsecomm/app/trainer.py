"""The trainer: one config builds every component; the trainer wires them and runs the steps.

Components, each small and usable alone, each in its own module::

    config.check_config(cfg)     every field checked up front; errors name the field and the fix
    data.ShardedData             this rank's shard of the training set (DistributedSampler), its
                                 Fisher batches, its slice of the test set; data.evaluate
    MaskSource                   mask/: fisher (on the rank's own shard) | random | width_core |
                                 file | dense (None); diff_pruning's comes from its L0 phase
                                 (sparsecomm/phases.py, as do the task diff and width-core report)
    gradient_sync.GradientSync   the masked all-reduce hook (or plain DDP for mask=dense); bytes
    build_optimizer              optim/: masked AdamW/SGD over the mask, or torch's dense one
    Trainer                      schedule/ decides, per step, dense or sparse and when to mask;
                                 checkpoints and resume (sparsecomm/fault.py)

What crosses the network per step is the hook's business (see :mod:`sparsecomm.hook`); the
trainer adds one all-reduce of a few float64 numbers per log line and per evaluation, and a
Fisher mask costs float64 all-reduces of the scores of the entries it ranks (all but those kept
whole; counted as ``mask_score_bytes``).

Rank 0 alone writes, into the run directory: ``config.yaml`` (resolved), ``metrics.jsonl``,
``mask.safetensors`` (with its digest), ``model.safetensors``, ``summary.json`` and, for masked
runs, ``task_diff.safetensors`` (``sparsecomm.diff``; with ``base.safetensors`` when the base is
the model after a dense warm-up).

Checkpoints and restarts (issue 6; :mod:`sparsecomm.app.fault`). With ``checkpoint.every=N`` rank 0
writes ``<checkpoint.dir>/step-NNNNNNNN.ckpt`` after every N-th step and after the last one
(temporary file, fsync, rename; SHA-256 header; the last ``checkpoint.keep`` kept). One holds
(:meth:`Trainer.state_dict`): the step (the schedule and the LR are pure functions of it); the
model's full state dict (weights and buffers, not a sparse diff); the mask's bits and digest;
the dense optimizer's and the masked optimizer's state dicts (the latter carries the mask
digest); the gradient sync's counters (hook steps, bytes sent, dense bytes; plain-DDP steps);
the mask source's rounds and Fisher score bytes; the data position (epoch, batch) and batch
size; the non-finite counters; the last log mark and EVERY rank's RNG states (torch, NumPy,
Python; all-gathered) and loss window; the world size, the model's tensor names and shapes, the
training config (all but :data:`sparsecomm.app.fault.RESUME_FREE`) and its hash; and ``extra``, the
state dicts of :attr:`Trainer.extra_state` (components added later, e.g. the task diff).

``checkpoint.resume=auto`` (default) makes :meth:`Trainer.fit` start from the newest checkpoint
that verifies (a damaged one is skipped, loudly); rank 0 reads it and broadcasts its bytes. With
the same world size and config a resumed run is bit-identical to an uninterrupted one on CPU
(tests/test_fault.py, tests/test_elastic.py); with another world size the mask and optimizer
state carry over, the data is re-sharded and the RNG reseeded, and a log line says so. Ranks
compare the config hash and mask digest at start, after a resume and after every mask
(re)computation. A step whose all-reduced gradient holds NaN/Inf is skipped on every rank
(``skipped_steps``); ``nonfinite.max_in_a_row`` in a row stop the run.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel

from sparsecomm import distributed as sdist
from . import fault, launch
from sparsecomm.checkpoint import write_atomic
from .config import ConfigError, config_hash
from .data import ShardedData, build_task, evaluate, forward
from .gradient_sync import GradientSync
from .metrics import human_bytes, make_logger
from .phases import (
    L0Phase,
    TaskDiffRecorder,
    build_schedule,
    run_outputs,
    summary_lines,
)
from .schedule import LRSchedule, set_lr

# --- masks ------------------------------------------------------------------------------------

class MaskSource:
    """Builds the shared mask per ``mask/`` (None for ``dense``), identical on every rank.

    ``always`` defaults to the task's classifier head. ``score_bytes`` counts what computing
    masks put on the network: per fisher mask, 8 bytes per ranked entry (all but ``always``).
    """

    def __init__(self, cfg: Mapping, task, data: ShardedData, model: torch.nn.Module, seed: int):
        from sparsecomm.mask import count_for_density, matches_any

        self.cfg, self.task, self.data, self.seed = cfg, task, data, seed
        self.kind = cfg.get("name")
        self.score_bytes = 0
        self.rounds = 0
        always = cfg.get("always")
        self.always = tuple(task.head if always is None else ([always] if isinstance(always, str) else always))
        if self.kind == "dense":
            return
        if self.kind == "file":  # loaded and checked now: a mask for another model stops the run here
            from sparsecomm.mask import Mask

            path = str(cfg.get("path"))
            try:
                self.file_mask = Mask.load(path, model)
            except ValueError as e:
                raise ConfigError(f"mask.path={path!r}: {e}") from None
            self.k = self.file_mask.num_selected
            return
        if self.kind == "width_core":  # checked now: a model that is not one chain of layers stops here
            from sparsecomm.width_core import width_core_mask

            try:
                self.k = width_core_mask(model, cfg.fraction).num_selected
            except TypeError as e:
                raise ConfigError(f"mask=width_core on task {task.name}: {e}") from None
            return
        params = dict(model.named_parameters())
        numel = sum(p.numel() for p in params.values())
        self.k = count_for_density(cfg.density, numel, field="mask.density")
        whole = sum(p.numel() for n, p in params.items() if matches_any(n, self.always))
        if whole > self.k:
            raise ConfigError(
                f"mask.density={cfg.density} keeps k={self.k} of {numel} entries, fewer than the {whole} entries "
                f"of the parameters always kept ({list(self.always)}); raise mask.density to at least "
                f"{whole / numel:.3g} or set mask.always=[]")

    @property
    def dense(self) -> bool:
        return self.kind == "dense"

    def build(self, model: torch.nn.Module):
        """A new mask (collective for fisher: every rank must call it at the same step)."""
        from sparsecomm.fisher import fisher_mask
        from sparsecomm.mask import random_mask

        round_, self.rounds = self.rounds, self.rounds + 1
        if self.kind == "file":
            return self.file_mask
        if self.kind == "width_core":
            from sparsecomm.width_core import width_core_mask

            return width_core_mask(model, self.cfg.fraction)
        if self.kind == "diff_pruning":
            raise RuntimeError("the diff-pruning mask comes from the L0 phase (Trainer._leave_l0), not MaskSource")
        if self.kind == "random":
            return random_mask(model, density=self.cfg.density, seed=int(self.cfg.get("seed", self.seed)) + round_,
                               always=self.always)
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise ConfigError("the model's weights hold NaN/Inf before its Fisher mask (the dense steps diverged): "
                              "lower optim.dense_lr, or shorten schedule.dense_steps")
        data = self.data.fisher_batches(round_, int(self.cfg.batch_size))
        mask = fisher_mask(model, data, self.task.loss_fn, density=self.cfg.density,
                           num_samples=int(self.cfg.num_samples), method=self.cfg.method, always=self.always,
                           chunk_size=int(self.cfg.chunk_size))
        if sdist.world_size() > 1:  # float64 sums of the trainable scores not kept whole (sparsecomm.fisher)
            from sparsecomm.mask import matches_any

            self.score_bytes += 8 * sum(p.numel() for n, p in model.named_parameters()
                                        if p.requires_grad and not matches_any(n, self.always))
        return mask


# --- optimizers -------------------------------------------------------------------

def _optimizer_kwargs(cfg: Mapping) -> dict[str, Any]:
    """``optim/``'s hyperparameters, as torch's AdamW/SGD (and our masked ones) take them."""
    if cfg.name == "adamw":
        kw = dict(betas=tuple(cfg.get("betas", (0.9, 0.999))), eps=float(cfg.get("eps", 1e-8)))
    else:
        kw = dict(momentum=float(cfg.get("momentum", 0.0)), nesterov=bool(cfg.get("nesterov", False)))
    return {**kw, "weight_decay": float(cfg.get("weight_decay", 0.0))}


def dense_optimizer(cfg: Mapping, params, lr: float) -> torch.optim.Optimizer:
    """torch's AdamW/SGD per ``optim/`` over ``params`` (tensors or param groups) at ``lr``."""
    return (torch.optim.AdamW if cfg.name == "adamw" else torch.optim.SGD)(params, lr=lr, **_optimizer_kwargs(cfg))


def build_optimizer(cfg: Mapping, model: torch.nn.Module, mask=None) -> tuple[torch.optim.Optimizer, float]:
    """``(optimizer, base lr)``: masked over ``mask`` at ``optim.lr``, else dense at ``optim.dense_lr``."""
    from sparsecomm.optim import MaskedAdamW, MaskedSGD

    if mask is None:
        lr = float(cfg.dense_lr)
        return dense_optimizer(cfg, [p for p in model.parameters() if p.requires_grad], lr), lr
    lr = float(cfg.lr)
    masked = MaskedAdamW if cfg.name == "adamw" else MaskedSGD
    return masked(model, mask, lr=lr, **_optimizer_kwargs(cfg)), lr


# --- the trainer ------------------------------------------------------------------------------

class Trainer:
    """Builds a run from ``cfg`` on an initialised process group and trains it (:meth:`fit`)."""

    def __init__(self, cfg: DictConfig, run_dir: str, device: torch.device, t0: float | None = None,
                 stop: fault.StopOnSignal | None = None):
        self.t0 = time.time() if t0 is None else t0
        self.stop = stop if stop is not None else fault.StopOnSignal(install=False)
        self.cfg, self.device = cfg, device
        self.rank, self.world = sdist.rank(), sdist.world_size()
        self.run_dir = sdist.gather_strings(os.path.abspath(run_dir))[0]  # rank 0's is the run's
        self._assert_same_config(config_hash(cfg))
        self.schedule = build_schedule(cfg)  # mask=diff_pruning: the L0 phase is part of the dense phase
        self.lr_schedule = LRSchedule.from_config(cfg.schedule.get("lr", {}), cfg.steps)

        torch.manual_seed(cfg.seed)  # same initial model on every rank (DDP broadcasts rank 0's anyway)
        self.task = build_task(cfg.task)
        self.model = self.task.model.to(device)
        self.data = ShardedData(self.task, self.rank, self.world, batch_size=cfg.batch_size,
                                eval_batch_size=cfg.eval_batch_size, seed=cfg.seed, device=device,
                                num_workers=cfg.num_workers)
        self.masks = MaskSource(cfg.mask, self.task, self.data, self.model, cfg.seed)
        self.ddp = self._wrap(self.model)
        # DDP broadcasts rank 0's buffers (BatchNorm statistics) before every training forward.
        self.buffer_bytes_per_step = sum(b.numel() * b.element_size() for b in self.model.buffers()) \
            if cfg.comm.sync_buffers and self.world > 1 else 0
        self.sync = GradientSync(self.ddp, masked=not self.masks.dense, comm=cfg.comm)
        self.mask = None
        self.dense_opt, self.dense_lr = build_optimizer(cfg.optim, self.model)
        self.sparse_opt, self.sparse_lr = None, None
        # Issue 5 (sparsecomm/phases.py): diff pruning's L0 phase; the task diff of masked runs; the
        # width core's initial weights for mask.compare_alone.
        self.l0 = L0Phase(cfg.mask, self.task.head, start=self.schedule.dense_steps - int(cfg.mask.l0_steps)) \
            if cfg.mask.name == "diff_pruning" else None
        self.task_diff = None if self.masks.dense else TaskDiffRecorder(template=self.model)
        self.initial_core, self.nested = None, None
        if cfg.mask.name == "width_core":
            from sparsecomm.width_core import NestedCore, export_core

            if cfg.mask.get("nested", True):  # the core stays a standalone subnetwork (core steps: its own loss)
                self.nested = NestedCore(self.model, cfg.mask.fraction)
            if cfg.mask.get("compare_alone"):
                self.initial_core = export_core(self.model, cfg.mask.fraction)
        torch.manual_seed(cfg.seed + 1 + self.rank)  # dropout etc. differ per rank from here on

        self.step = 0
        # Fault tolerance (sparsecomm/fault.py): checkpoints, resume, non-finite steps.
        self.checkpoints = fault.Checkpoints(cfg.get("checkpoint"), self.run_dir)
        sdist.rank0_decides(self.checkpoints.check_writable, fault.CheckpointError)  # now, not at the first checkpoint
        self.nonfinite = fault.NonFiniteGuard((cfg.get("nonfinite") or {}).get("max_in_a_row", 5))
        self.training_hash = fault.training_hash(cfg)
        # Extension point: name -> object with state_dict()/load_state_dict() (e.g. a diff-pruning
        # phase); saved in every checkpoint under "extra" and restored on resume, after the model.
        self.extra_state: dict[str, Any] = {}
        if self.task_diff is not None:
            self.extra_state["task_diff"] = self.task_diff  # its base weights and the union of the masks so far
        if self.l0 is not None:
            self.extra_state["l0_phase"] = self.l0
        self.resumed_from: str | None = None
        self._window = torch.zeros(2, dtype=torch.float64, device=device)  # this rank's summed loss, steps since the last log
        self._mark = (0, 0)  # (step, bytes sent) at the last train log
        self.log = make_logger(cfg.logging, self.run_dir, cfg.steps,
                               config=OmegaConf.to_container(cfg, resolve=True))
        numel = sum(p.numel() for p in self.model.parameters())
        self.log.info(
            f"sparsecomm: task={self.task.name} ({numel:,} parameters), mask={self.masks.kind}, "
            f"schedule={self.schedule.name}, {self.world} ranks ({cfg.cluster.backend}, {device.type}), "
            f"run dir {self.run_dir}")

    @staticmethod
    def _assert_same_config(digest: str) -> None:
        """Collective: stop, listing every rank's hash, unless all ranks run the same config."""
        sdist.assert_same_on_all_ranks(digest, "config hash", fix="Start every rank with the same config and overrides.")

    # -- per step ------------------------------------------------------------------------------
    def _prepare(self, step: int) -> tuple[torch.optim.Optimizer, float]:
        """Apply the schedule before ``step``: mask (re)computation, dense or masked sync."""
        if self.masks.dense:
            return self.dense_opt, self.dense_lr
        if self.l0 is not None and step == self.l0.start and not self.l0.active:
            self._enter_l0(step)
        if self.schedule.mask_due(step):
            self._new_mask(step)
        dense = self.schedule.sends_dense(step)
        if self.task_diff is not None and self.schedule.is_full_step(step):
            self.task_diff.full_step(step)
        self.sync.set_dense(dense)
        return (self.dense_opt, self.dense_lr) if dense else (self.sparse_opt, self.sparse_lr)

    def _new_mask(self, step: int) -> None:
        t = time.perf_counter()
        mask = self._leave_l0() if self.l0 is not None and self.l0.active else self.masks.build(self.model)
        self.sync.set_mask(mask)  # checks every rank holds this mask
        if self.task_diff is not None:
            self.task_diff.set_base(self.model, step)  # the first time only: the weights masked training starts from
            self.task_diff.add_mask(mask)
        self._assert_same_config(self.training_hash)
        if self.sparse_opt is None:
            self.sparse_opt, self.sparse_lr = build_optimizer(self.cfg.optim, self.model, mask)
        else:
            self.sparse_opt.reset_mask(mask)  # refresh: state of entries that stay selected carries over
        self.mask = mask
        digest = mask.save(os.path.join(self.run_dir, "mask.safetensors")) if sdist.is_main_process() else mask.digest()
        self.log.log("mask", step, kind=self.masks.kind, k=mask.num_selected, numel=mask.numel,
                     density=mask.density, digest=digest, seconds=round(time.perf_counter() - t, 3))
        self.log.info(f"step {step}: {self.masks.kind} mask, k={mask.num_selected:,} of {mask.numel:,} "
                      f"(density {mask.density:.4g}), digest {digest[:12]}, {time.perf_counter() - t:.1f} s")

    def _wrap(self, module: torch.nn.Module) -> DistributedDataParallel:
        cfg, device = self.cfg, self.device
        return DistributedDataParallel(  # gradients as views of DDP's buckets: one n-sized copy, not two
            module, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True,
            bucket_cap_mb=cfg.comm.bucket_cap_mb, **_buffer_sync_kwargs(bool(cfg.comm.sync_buffers)))

    # -- mask=diff_pruning: model -> L0 wrapper -> plain model (sparsecomm/phases.py) -----------
    def _swap_model(self, module: torch.nn.Module, **sync_kw) -> None:
        """Train ``module`` from now on: a new DDP and hook; the byte counters go on."""
        self.model, self.ddp = module, self._wrap(module)
        self.sync = GradientSync(self.ddp, masked=True, comm=self.cfg.comm, previous=self.sync, **sync_kw)

    def _enter_l0(self, step: int) -> None:
        self.task_diff.set_base(self.model, step)  # the frozen base, before the L0 phase moves its buffers
        plain_bytes = self.sync.grad_bytes  # what dense DDP of the plain model sends per step
        self._swap_model(self.l0.wrap(self.model, self.sync.bytes_sent), dense_bytes_per_step=plain_bytes)
        self.dense_opt, self.dense_lr = self.l0.optimizer(self.cfg.optim)
        w = self.model
        self.log.info(f"step {step}: diff pruning L0 phase for {self.l0.l0_steps} steps: base frozen, "
                      f"{w.comm_numel:,} gradient entries (w + log_alpha) all-reduced per step")

    def _leave_l0(self):
        mask, model = self.l0.finish(list(self.masks.always), self.sync.bytes_sent)
        self._swap_model(model)
        self.dense_opt, self.dense_lr = build_optimizer(self.cfg.optim, self.model)
        s = self.l0.summary()
        self.log.log("l0", self.step, **s)
        self.log.info(f"step {self.step}: L0 phase done ({human_bytes(s['l0_bytes_sent'])} sent), E[L0] "
                      f"{s['l0_expected_l0']:.4g}, gates open {s['l0_gates_open']:.4f}; projected to the mask below")
        return mask

    def train_step(self, step: int) -> torch.Tensor:
        """One step: forward, backward (the hook syncs), optimizer update. Returns the local loss."""
        optimizer, base_lr = self._prepare(step)
        set_lr(optimizer, base_lr * self.lr_schedule.factor(step))
        inputs, targets = self.data.next_batch()
        if self.nested is not None:  # width core: a core step's forward is the standalone core's
            self.nested.begin_step(full=self.schedule.sends_dense(step))
        loss = self.task.loss_fn(forward(self.ddp, inputs), targets)
        (loss + self.l0.penalty() if self.l0 is not None and self.l0.active else loss).backward()
        self.sync.after_backward()
        if self.nonfinite.check(self.sync.found_nonfinite(self.model), step):
            self.log.log("nonfinite", step + 1, skipped=self.nonfinite.skipped, in_a_row=self.nonfinite.in_a_row)
            self.log.info(f"step {step}: the all-reduced gradient holds NaN/Inf; step skipped on every rank "
                          f"({self.nonfinite.in_a_row} in a row, {self.nonfinite.skipped} in all)")
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if self.nested is not None:
            self.nested.end_step()
        self.step = step + 1
        return loss.detach()

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint holds (see the module doc). Collective: gathers every rank's RNG state."""
        from sparsecomm.checkpoint import rng_state

        mine = {"rng": rng_state(), "window": self._window.detach().cpu().clone()}
        ranks = [mine]
        if sdist.is_initialized() and self.world > 1:
            ranks = [None] * self.world
            dist.all_gather_object(ranks, mine)
        mask = self.mask
        return {
            "format": fault.FORMAT, "step": self.step, "world_size": self.world,
            "config": fault.training_config(self.cfg), "config_hash": self.training_hash,
            "model_signature": fault.model_signature(self.model),
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "mask": {n: mask[n] for n in mask} if mask is not None else None,
            "mask_digest": mask.digest() if mask is not None else None,
            "dense_opt": self.dense_opt.state_dict(),
            "sparse_opt": self.sparse_opt.state_dict() if self.sparse_opt is not None else None,
            "sync": self.sync.state_dict(),
            "masks": {"rounds": self.masks.rounds, "score_bytes": self.masks.score_bytes},
            "data": {**self.data.state_dict(), "batch_size": int(self.cfg.batch_size)},
            "nonfinite": self.nonfinite.state_dict(),
            "log_mark": list(self._mark),
            "ranks": ranks,
            "extra": {name: part.state_dict() for name, part in self.extra_state.items()},
        }

    def load_state_dict(self, sd: Mapping[str, Any], source: str = "checkpoint") -> None:
        """Restore :meth:`state_dict` (collective: ranks check they agree on the mask and config).

        Same world size: each rank gets back its own RNG state and data position, so the run
        continues bit for bit. Another world size: the data is re-sharded at the same epoch and
        example count, RNG reseeded from (seed, step, rank), and a log line says so.
        """
        from sparsecomm.mask import Mask
        from sparsecomm.checkpoint import set_rng_state

        fix = ("start a new run with another run_id=... (a fresh folder), or point checkpoint.resume at checkpoints "
               "of this model and config")
        if sd.get("format") != fault.FORMAT:
            raise fault.CheckpointError(f"{source} has format {sd.get('format')!r}, not {fault.FORMAT}; {fix}")
        if self.l0 is not None and self.l0.start <= int(sd["step"]) < self.schedule.dense_steps and not self.l0.active:
            self._enter_l0(self.l0.start)  # a checkpoint inside diff pruning's L0 phase holds the wrapper
        why = fault.signature_difference(sd["model_signature"], fault.model_signature(self.model))
        if why is not None:
            raise fault.CheckpointError(f"{source} is a checkpoint of another model: {why}; {fix}")
        if sd["config_hash"] != self.training_hash:
            diffs = fault.config_differences(sd["config"], fault.training_config(self.cfg))
            raise fault.CheckpointError(
                f"{source} was written with another config: {'; '.join(diffs[:3]) or 'hash differs'}; rerun with "
                f"the checkpoint's values, or {fix}")
        self.model.load_state_dict(sd["model"])
        self.dense_opt.load_state_dict(sd["dense_opt"])
        if sd["mask"] is not None:
            mask = Mask(sd["mask"])
            if mask.digest() != sd["mask_digest"]:
                raise fault.CheckpointError(f"{source}: its mask does not match its stored digest; {fix}")
            mask.validate(self.model)
            self.sync.set_mask(mask)  # collective: every rank holds this mask, or an error lists the digests
            self.sparse_opt, self.sparse_lr = build_optimizer(self.cfg.optim, self.model, mask)
            self.sparse_opt.load_state_dict(sd["sparse_opt"])
            self.mask = mask
        self.sync.load_state_dict(sd["sync"])
        self.masks.rounds, self.masks.score_bytes = int(sd["masks"]["rounds"]), int(sd["masks"]["score_bytes"])
        self.nonfinite.load_state_dict(sd["nonfinite"])
        for name, part in self.extra_state.items():
            if name in sd.get("extra", {}):
                part.load_state_dict(sd["extra"][name])
        self.step = int(sd["step"])
        saved_world = int(sd["world_size"])
        if saved_world == self.world:
            self.data.load_state_dict(sd["data"])  # replays this epoch's batches (consumes RNG: restore after)
            mine = sd["ranks"][self.rank]
            set_rng_state(mine["rng"])
            self._window.copy_(mine["window"])
            self._mark = tuple(int(v) for v in sd["log_mark"])
        else:
            data = sd["data"]
            examples = int(data["batch"]) * int(data["batch_size"]) * saved_world  # this epoch, all ranks
            batch = examples // (int(self.cfg.batch_size) * self.world)
            self.data.load_state_dict({"epoch": int(data["epoch"]), "batch": min(batch, len(self.data.train_loader))})
            torch.manual_seed(int(self.cfg.seed) + 1 + self.rank + 1_000_003 * self.step)
            self._window.zero_()
            self._mark = (self.step, self.sync.bytes_sent)
            self.log.info(
                f"resuming a {saved_world}-rank checkpoint on {self.world} ranks: the mask and the optimizer "
                f"state are global and carry over; the data is re-sharded (epoch {data['epoch']}, ~{examples} "
                f"examples in) and the RNG reseeded, so this run is not bit-identical to an uninterrupted one")
        self._assert_same_config(self.training_hash)
        sdist.assert_same_on_all_ranks(self.mask.digest() if self.mask is not None else "none", "mask digest",
                                       fix="Every rank must load the same checkpoint.")

    def save_checkpoint(self) -> str | None:
        """Collective: every rank calls it at the same step; rank 0 writes. Returns the path on rank 0."""
        t = time.perf_counter()
        path = self.checkpoints.save(self.step, self.state_dict)
        if path is not None:
            self.log.log("checkpoint", self.step, path=path, seconds=round(time.perf_counter() - t, 3))
        return path

    def resume(self) -> bool:
        """Load the checkpoint ``checkpoint.resume`` names (auto: the newest valid one), if any."""
        found = self.checkpoints.fetch()
        if found is None:
            return False
        path, sd = found
        self.load_state_dict(sd, source=path)
        self.resumed_from = path
        if self.mask is not None and sdist.is_main_process():
            self.mask.save(os.path.join(self.run_dir, "mask.safetensors"))  # the run dir may be a new one
        self.log.log("resume", self.step, path=path, world_size=self.world, saved_world_size=int(sd["world_size"]),
                     resharded=int(sd["world_size"]) != self.world)
        self.log.info(f"resumed from {path} at step {self.step} (written by {sd['world_size']} ranks)")
        return True

    # -- the loop ------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        self.resume()  # per checkpoint.resume; a no-op when there is no checkpoint
        if sdist.is_main_process():  # only now: a refused resume leaves the folder's record as it was
            os.makedirs(self.run_dir, exist_ok=True)
            OmegaConf.save(cfg, os.path.join(self.run_dir, "config.yaml"), resolve=True)
        log_every = max(int(cfg.logging.get("log_every", 10)), 1)
        window = self._window  # summed loss, steps (this rank's, since the last log)
        mark = (time.perf_counter(), *self._mark)  # time, step, bytes at the last log
        start = time.perf_counter()
        for step in range(self.step, self.schedule.steps):
            loss = self.train_step(step)
            if not self.nonfinite.last_skipped:
                window += torch.stack([loss.double(), window.new_ones(())])
            done = step + 1
            self.log.progress(done)
            stop = self.stop.requested and self.world == 1
            if done % log_every == 0 or done == self.schedule.steps:
                mark, stop = self._log_train(done, window, mark)
                self._mark = mark[1:]
                window.zero_()
            if cfg.eval_every and done % cfg.eval_every == 0 and done != self.schedule.steps:
                self._log_eval(done)
            saved = self.save_checkpoint() if self.checkpoints.due(done, self.schedule.steps) else None
            if stop and done < self.schedule.steps:
                self._stop_on_signal(done, saved)
        train_s = time.perf_counter() - start
        final = self._log_eval(self.schedule.steps)
        return self._finish(final, train_s)

    def _stop_on_signal(self, done: int, saved: str | None) -> None:
        """Every rank at the same step: write a checkpoint (if they are on) and raise Interrupted."""
        signum = self.stop.signum or int(fault.signal.SIGTERM)  # a rank that got none stops with its peers
        if self.checkpoints.every > 0 and saved is None:
            saved = self.save_checkpoint()
        if self.checkpoints.every > 0:
            kept = f"checkpoint {saved} written" if sdist.is_main_process() else "checkpoint written"
        else:
            kept = "no checkpoint (checkpoint.every=0)"
        self.log.log("interrupted", done, signal=fault.signal_name(signum), checkpoint=saved)
        raise fault.Interrupted(f"interrupted by {fault.signal_name(signum)} at step {done} of "
                                f"{self.schedule.steps}; {kept}", signum)

    def _log_train(self, done: int, window: torch.Tensor, mark: tuple) -> tuple[tuple, bool]:
        """Log the loss window (one all-reduce of 3 float64: loss sum, steps, stop requests).

        Returns the new mark and whether any rank asked to stop (SIGINT/SIGTERM): the ranks
        agree on it here, so they all stop at this step.
        """
        reduced = torch.cat([window, window.new_tensor([float(self.stop.requested)])])
        if sdist.is_initialized():
            dist.all_reduce(reduced)
        window.copy_(reduced[:2])
        loss = (window[0] / window[1].clamp(min=1)).item()
        now, sent = time.perf_counter(), self.sync.bytes_sent
        steps = max(done - mark[1], 1)
        per_step = (sent - mark[2]) / steps
        lr = self.lr_schedule.factor(done - 1)
        self.log.log("train", done, loss=loss, steps_per_s=steps / max(now - mark[0], 1e-9),
                     bytes_per_step=per_step, bytes_sent=sent, dense_bytes=self.sync.dense_bytes,
                     lr_factor=lr, dense=self.masks.dense or self.schedule.sends_dense(done - 1),
                     skipped_steps=self.nonfinite.skipped)
        self.log.progress(done, loss=f"{loss:.4f}", sent=f"{human_bytes(per_step)}/step")
        return (now, done, sent), bool(reduced[2] > 0)

    def _log_eval(self, done: int) -> dict[str, float]:
        if self.buffer_bytes_per_step:
            # Every rank evaluates with rank 0's buffers (BatchNorm statistics), those of the saved
            # model: DDP broadcasts them before each training forward, not after the last one.
            for b in self.model.buffers():
                dist.broadcast(b, 0)
        result = evaluate(self.model, self.data.test_loader, self.task.loss_fn, self.device)
        self.log.log("eval", done, **result)
        self.log.info(f"step {done}: test accuracy {result['test_acc']:.4f}, loss {result['test_loss']:.4f}")
        return result

    def _finish(self, final: dict[str, float], train_s: float) -> dict[str, Any]:
        cfg, sync = self.cfg, self.sync
        summary = {
            "task": self.task.name, "mask": self.masks.kind, "schedule": self.schedule.name,
            "world_size": self.world, "backend": cfg.cluster.backend, "steps": self.schedule.steps,
            "dense_steps": 0 if self.masks.dense else self.schedule.dense_steps,
            "numel": sum(p.numel() for p in self.model.parameters()),
            "k": self.mask.num_selected if self.mask is not None else None,
            "density": self.mask.density if self.mask is not None else 1.0,
            "mask_digest": self.mask.digest() if self.mask is not None else None,
            "test_acc": final["test_acc"], "test_loss": final["test_loss"],
            "wall_s": time.time() - self.t0, "train_s": train_s,
            "bytes_sent": sync.bytes_sent, "dense_bytes": sync.dense_bytes,
            "ratio": sync.bytes_sent / sync.dense_bytes if sync.dense_bytes else float("nan"),
            "mask_score_bytes": self.masks.score_bytes,
            "buffer_bytes": self.buffer_bytes_per_step * self.schedule.steps,
            "wire_dtype": cfg.comm.wire_dtype, "run_dir": self.run_dir,
            "skipped_steps": self.nonfinite.skipped, "resumed_from": self.resumed_from,
        }
        summary.update(run_outputs(self))  # L0-phase bytes, the task diff, the width core alone (collective)
        self.log.log("summary", self.schedule.steps, **summary)
        if sdist.is_main_process():
            if cfg.get("save_model", True):
                from safetensors.torch import save_model

                path = os.path.join(self.run_dir, "model.safetensors")
                save_model(self.model, path + ".tmp")
                os.replace(path + ".tmp", path)
            # summary.json last: its presence marks the run finished (sparsecomm/rundir.py).
            write_atomic(os.path.join(self.run_dir, "summary.json"), json.dumps(summary, indent=2).encode())
            report = format_summary(summary, cfg.cluster)
            self.log.write_log(report)
            print(report, flush=True)
        self.log.close()
        return summary

    def close(self) -> None:
        """Close the logger and drop the DDP wrapper, its hook and the optimizers (see ``leave_process_group``)."""
        self.log.close()
        self.ddp = self.sync = self.dense_opt = self.sparse_opt = None


def _buffer_sync_kwargs(sync: bool) -> dict[str, bool]:
    """DDP's per-forward buffer broadcast switch, by its name in this torch version."""
    import inspect

    if sync:
        return {}  # DDP's default
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def format_summary(s: Mapping[str, Any], cluster: Mapping | None = None) -> str:
    """The end-of-run report a user reads."""
    mask = "dense (plain DDP)" if s["mask"] == "dense" else (
        f"{s['mask']} mask, k={s['k']:,} of {s['numel']:,} (density {s['density']:.4g})")
    lines = [
        f"== sparsecomm summary: {s['task']} | {mask} | {s['world_size']} ranks ({s['backend']}) | "
        f"{s['steps']} steps ({s['dense_steps']} dense) ==",
        f"  test accuracy    {s['test_acc']:.4f}",
        f"  wall time        {s['wall_s']:.1f} s (training loop {s['train_s']:.1f} s)",
        f"  sent by the hook {human_bytes(s['bytes_sent'])}  (gradient all-reduce payload per rank)",
        f"  dense DDP        {human_bytes(s['dense_bytes'])}  for the same steps",
    ]
    if s["dense_bytes"]:
        ratio = s["ratio"]
        fewer = f"  ({1 / ratio:.1f}x fewer bytes)" if 0 < ratio < 1 else ""
        lines.append(f"  ratio            {ratio:.4f}{fewer}")
    if s["mask_score_bytes"]:
        lines.append(f"  Fisher scores    {human_bytes(s['mask_score_bytes'])}  (float64 sums of the ranked scores, per mask)")
    if s.get("buffer_bytes"):
        lines.append(f"  buffers          {human_bytes(s['buffer_bytes'])}  (module buffers, e.g. BatchNorm "
                     f"statistics, that DDP broadcasts from rank 0 every step, dense or not)")
    link = _link_gbit(cluster, s["world_size"]) if cluster is not None else None
    if link and s["world_size"] > 1:
        ring = 2 * (s["world_size"] - 1) / s["world_size"] / (link * 1e9 / 8)
        lines.append(f"  at {link:g} Gbit/s    ~{s['bytes_sent'] * ring:.3g} s on the wire "
                     f"(dense DDP ~{s['dense_bytes'] * ring:.3g} s), ring all-reduce estimate")
    lines += summary_lines(s)  # diff pruning, task diff, width core
    lines.append(f"  outputs          {s['run_dir']}")
    return "\n".join(lines)


def _link_gbit(cluster: Mapping, world: int) -> float | None:
    link = cluster.get("link") or {}
    nnodes = int(cluster.get("nnodes", 1)) if str(cluster.get("nnodes", 1)).isdigit() else 1
    value = link.get("inter_node_gbit") if nnodes > 1 else link.get("intra_node_gbit")
    return float(value) if value else None


def run(cfg: DictConfig, run_dir: str, t0: float | None = None) -> dict[str, Any]:
    """Every rank's whole life: join the process group, train, leave. Returns the summary.

    SIGINT/SIGTERM stop the run at a step boundary (:class:`sparsecomm.app.fault.StopOnSignal`).
    """
    stop = fault.StopOnSignal()
    device = launch.init_process_group(cfg.cluster)
    trainer = None
    try:
        trainer = Trainer(cfg, run_dir, device, t0, stop=stop)
        return trainer.fit()
    finally:
        if trainer is not None:
            trainer.close()
        del trainer
        launch.leave_process_group()
        stop.restore()
