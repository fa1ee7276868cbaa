"""The trainer: one config builds the components; the trainer wires them and runs the steps.

    data.ShardedData           this rank's shard, its Fisher batches, its slice of the test set
    masks.MaskKind             mask/: builds the shared mask and takes part in steps (masks/*.py)
    comm.build_comm            comm/: DDP and its hook (dense, fp16, bf16, powersgd, post_local, masked); bytes sent
    optimizers                 optim/: torch's dense AdamW/SGD, the library's masked ones
    engine.StepEngine          the one step: forward, backward (the hook syncs), update
    run_state.RunState         what a checkpoint holds, component by component (fault.Checkpoints writes)

What crosses the network per step is the hook's (:mod:`sparsecomm.hook`); the trainer adds one
all-reduce of 3 float64 per log line (loss sum, steps, stop requests) and of 3 per evaluation.
Rank 0 alone writes into the run directory: ``config.yaml``, ``log.txt``, ``metrics.jsonl``,
``mask.safetensors``, ``model.safetensors``, ``task_diff.safetensors`` (masked runs) and, last,
``summary.json``. Ranks compare the config hash and the mask digest at start, after a resume
and after every mask.
"""
from __future__ import annotations

import os
import time
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from sparsecomm import distributed as sdist
from sparsecomm.mask import Mask

from . import fault, launch, peers, writes
from .config import config_hash, training_config
from .data import ShardedData, build_task, evaluate
from .engine import StepEngine
from .comm import build_comm, uses_mask
from .masks import Setting, build_mask_kind
from .metrics import make_logger
from .monitor import TrainMonitor
from .optimizers import build_optimizer
from .report import publish
from .run_state import FORMAT, Attr, MaskState, Progress, RankBuffers, RunState, resume_notes
from .schedule import LRSchedule, Schedule
from .task_diff import TaskDiffRecorder

FIX = ("start a new run with another run_id=... (a fresh folder), or point checkpoint.resume at checkpoints "
       "of this model and config")


class Trainer:
    """Builds a run from ``cfg`` on an initialised process group and trains it (:meth:`fit`)."""

    def __init__(self, cfg: DictConfig, run_dir: str, device: torch.device, t0: float | None = None,
                 stop: fault.StopOnSignal | None = None):
        self.t0 = time.time() if t0 is None else t0
        self.stop = stop if stop is not None else fault.StopOnSignal(install=False)
        self.cfg, self.device = cfg, device
        self.rank, self.world = sdist.rank(), sdist.world_size()
        self.run_dir = sdist.gather_strings(os.path.abspath(run_dir))[0]  # rank 0's is the run's
        self.config_hash = config_hash(cfg)  # of the training config: ranks, checkpoints and resumes compare it
        _assert_same_config(self.config_hash)
        torch.manual_seed(cfg.seed)  # same initial model on every rank (DDP broadcasts rank 0's anyway)
        self.task = build_task(cfg.task)
        self.model = self.task.model.to(device)
        self.data = ShardedData(self.task, self.rank, self.world, batch_size=cfg.batch_size,
                                eval_batch_size=cfg.eval_batch_size, seed=cfg.seed, device=device,
                                num_workers=cfg.num_workers)
        self.kind, self.unused_mask = _mask_kind(cfg, Setting(self.task, self.data, self.model, cfg.seed))
        self.schedule = self.kind.plan(Schedule.from_config(cfg.schedule, cfg.steps, cfg.seed, masked=not self.kind.dense))
        self.lr_schedule = LRSchedule.from_config(cfg.schedule.lr, cfg.steps)
        self.sync = build_comm(cfg.comm, self.model, device, masked=not self.kind.dense)
        self.ddp = self.sync.ddp
        # DDP broadcasts rank 0's buffers (BatchNorm statistics) before every training forward.
        self.buffer_bytes_per_step = sum(b.numel() * b.element_size() for b in self.model.buffers()) \
            if cfg.comm.sync_buffers and self.world > 1 else 0
        self.mask: Mask | None = None
        self.dense_opt, self.dense_lr = build_optimizer(cfg.optim, self.model)
        self.sparse_opt, self.sparse_lr = None, None
        self.task_diff = None if self.kind.dense else TaskDiffRecorder(template=self.model)
        torch.manual_seed(cfg.seed + 1 + self.rank)  # dropout etc. differ per rank from here on

        self.step = 0
        self.checkpoints = fault.Checkpoints(cfg.checkpoint, self.run_dir)
        sdist.rank0_decides(self.checkpoints.check_writable, fault.CheckpointError)  # now, not at the first checkpoint
        self.nonfinite = fault.NonFiniteGuard(cfg.nonfinite.max_in_a_row)
        self.engine = StepEngine(self.ddp, self.task.loss_fn, sync=self.sync, nonfinite=self.nonfinite)
        self.resumed_from: str | None = None
        self.log = make_logger(cfg.logging, self.run_dir, cfg.steps, config=OmegaConf.to_container(cfg, resolve=True))
        self.monitor = TrainMonitor(self.log, self.stop, device, every=cfg.logging.log_every, sync=lambda: self.sync,
                                    dense_at=lambda s: self.kind.dense or self.schedule.sends_dense(s),
                                    lr_factor=self.lr_schedule.factor, skipped=lambda: self.nonfinite.skipped)
        self.progress = Progress(self.data, int(cfg.batch_size), self.monitor, int(cfg.seed), lambda: self.step,
                                 lambda: self.sync.bytes_sent)
        self.state = RunState()
        self.rank_buffers = RankBuffers(lambda: self.model)
        for name, part in [("model", Attr(self, "model", cpu=True)), ("buffers", self.rank_buffers),
                           ("dense_opt", Attr(self, "dense_opt")),
                           ("mask", MaskState(lambda: self.mask, self._adopt_loaded_mask)),
                           ("sparse_opt", _WithoutDigest(Attr(self, "sparse_opt"))), ("sync", Attr(self, "sync")),
                           ("mask_kind", self.kind), ("progress", self.progress), ("nonfinite", self.nonfinite)]:
            self.state.register(name, part)
        if self.task_diff is not None:
            self.state.register("task_diff", self.task_diff)
        self.log.info(
            f"sparsecomm: task={self.task.name} ({sum(p.numel() for p in self.model.parameters()):,} parameters), "
            f"mask={self.kind.name}, schedule={self.schedule.name}, {self.world} ranks ({cfg.cluster.backend}, "
            f"{device.type}), run dir {self.run_dir}")
        if self.unused_mask:
            self.log.info(f"comm={cfg.comm.name}: every entry trains (dense optimizer); mask={self.unused_mask} is unused")

    # -- steps -----------------------------------------------------------------------------------
    def train_step(self, step: int) -> torch.Tensor:
        """One step: the schedule's mask and mode, then the engine's step. Returns the local loss."""
        optimizer, base_lr = self._prepare(step)
        loss = self.engine.step(self.data.next_batch(), optimizer, base_lr * self.lr_schedule.factor(step),
                                step=step, extra_loss=self.kind.extra_loss, after_update=self.sync.after_update)
        if self.engine.last_skipped:
            self.log.log("nonfinite", step + 1, skipped=self.nonfinite.skipped, in_a_row=self.nonfinite.in_a_row)
            self.log.info(f"step {step}: the all-reduced gradient holds NaN/Inf; step skipped on every rank "
                          f"({self.nonfinite.in_a_row} in a row, {self.nonfinite.skipped} in all)")
        self.kind.after_step()
        self.step = step + 1
        return loss

    def _prepare(self, step: int) -> tuple[torch.optim.Optimizer, float]:
        """Apply the schedule before ``step``: a new mask when due, the kind's hook, dense or masked sync."""
        if self.kind.dense:
            return self.dense_opt, self.dense_lr
        if self.schedule.mask_due(step):
            self.new_mask(step)
        dense = self.schedule.sends_dense(step)
        if self.task_diff is not None and self.schedule.is_full_step(step):
            self.task_diff.full_step(step)
        self.kind.before_step(self, step, dense)  # diff pruning may swap the model (and the sync) here
        self.sync.set_dense(dense)
        return (self.dense_opt, self.dense_lr) if dense else (self.sparse_opt, self.sparse_lr)

    def new_mask(self, step: int) -> None:
        """The kind's mask for ``step`` (collective), on the hook and the masked optimizer; rank 0 saves it."""
        t = time.perf_counter()
        mask = self.kind.new_mask(self, step)
        self._use_mask(mask)  # checks every rank holds this mask
        if self.task_diff is not None:
            self.task_diff.set_base(self.model, step)  # the first time only: the weights masked training starts from
            self.task_diff.add_mask(mask)
        _assert_same_config(self.config_hash)
        digest = save_mask(mask, self.run_dir) if sdist.is_main_process() else mask.digest()
        seconds = time.perf_counter() - t
        self.log.log("mask", step, kind=self.kind.name, k=mask.num_selected, numel=mask.numel,
                     density=mask.density, digest=digest, seconds=round(seconds, 3))
        self.log.info(f"step {step}: {self.kind.name} mask, k={mask.num_selected:,} of {mask.numel:,} "
                      f"(density {mask.density:.4g}), digest {digest[:12]}, {seconds:.1f} s")

    def _use_mask(self, mask: Mask) -> None:
        self.sync.set_mask(mask)  # collective: every rank holds this mask, or an error lists the digests
        if self.sparse_opt is None:
            self.sparse_opt, self.sparse_lr = build_optimizer(self.cfg.optim, self.model, mask)
        else:
            self.sparse_opt.reset_mask(mask)  # refresh: state of entries that stay selected carries over
        self.mask = mask

    def swap_model(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                   lr: float | None = None, *, dense_bytes_per_step: int | None = None) -> None:
        """Train ``module`` from now on (diff pruning): a new DDP and hook, the byte counters go
        on; ``optimizer`` at ``lr`` for dense steps (default: ``optim/``'s dense one)."""
        self.sync = build_comm(self.cfg.comm, module, self.device, previous=self.sync,
                               dense_bytes_per_step=dense_bytes_per_step)
        self.model, self.ddp = module, self.sync.ddp
        self.dense_opt, self.dense_lr = (optimizer, lr) if optimizer is not None else \
            build_optimizer(self.cfg.optim, module)
        self.engine.module, self.engine.sync = self.ddp, self.sync

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint holds (:mod:`sparsecomm.app.run_state`). Collective (RNG states)."""
        return self.state.state_dict({
            "step": self.step, "world_size": self.world, "config": training_config(self.cfg),
            "config_hash": self.config_hash, "model_signature": fault.model_signature(self.model)})

    def load_state_dict(self, sd: dict[str, Any], source: str = "checkpoint") -> None:
        """Restore :meth:`state_dict` (collective: ranks check they agree on the mask and config)."""
        if sd.get("format") != FORMAT:
            raise fault.CheckpointError(f"{source} has format {sd.get('format')!r}, not {FORMAT}; {FIX}")
        self.kind.before_load(self, int(sd["step"]))  # e.g. a checkpoint inside diff pruning's L0 phase
        why = fault.signature_difference(sd["model_signature"], fault.model_signature(self.model))
        if why is not None:
            raise fault.CheckpointError(f"{source} is a checkpoint of another model: {why}; {FIX}")
        if sd["config_hash"] != self.config_hash:
            diffs = fault.config_differences(sd["config"], training_config(self.cfg))
            raise fault.CheckpointError(f"{source} was written with another config: "
                                        f"{'; '.join(diffs[:3]) or 'hash differs'}; rerun with the checkpoint's values, or {FIX}")
        self.step = int(sd["step"])
        try:
            self.state.load_state_dict(sd)
        except ValueError as e:
            raise fault.CheckpointError(f"{source}: {e}; {FIX}") from None
        for line in resume_notes(sd, self.progress, self.rank_buffers):
            self.log.info(line)
        _assert_same_config(self.config_hash)
        sdist.assert_same_on_all_ranks(self.mask.digest() if self.mask is not None else "none", "mask digest",
                                       fix="Every rank must load the same checkpoint.")

    def _adopt_loaded_mask(self, mask: Mask) -> None:
        mask.validate(self.model)
        self._use_mask(mask)

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
            save_mask(self.mask, self.run_dir)  # the run dir may be a new one
        dropped = self.log.rewind(self.step)  # the crashed run's records past this checkpoint: re-done now
        self.log.log("resume", self.step, path=path, world_size=self.world, saved_world_size=int(sd["world_size"]),
                     resharded=int(sd["world_size"]) != self.world, dropped_records=dropped)
        self.log.info(f"resumed from {path} at step {self.step} (written by {sd['world_size']} ranks)")
        return True

    # -- the loop --------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Resume if a checkpoint says so, train to the last step, evaluate, report. Returns the summary."""
        cfg, steps = self.cfg, self.schedule.steps
        if not self.resume():  # per checkpoint.resume; without a checkpoint the run starts at step 0
            self.log.rewind(0)  # (a restarted job: its first attempt's records go)
        if sdist.is_main_process():  # only now: a refused resume leaves the folder's record as it was
            write_config(cfg, self.run_dir)
        self.monitor.start()
        start = time.perf_counter()
        for step in range(self.step, steps):
            loss = self.train_step(step)
            done = step + 1
            stop = self.monitor.after_step(done, loss, self.engine.last_skipped, done == steps, self.world)
            if cfg.eval_every and done % cfg.eval_every == 0 and done != steps:
                self.evaluate(done)
            saved = self.save_checkpoint() if self.checkpoints.due(done, steps) else None
            if stop and done < steps:  # every rank at the same step
                raise fault.interrupted(self.stop.signum, done, steps, self.checkpoints, saved, self.save_checkpoint,
                                        self.log)
        train_s = time.perf_counter() - start
        return self._finish(self.evaluate(steps), train_s)

    def evaluate(self, done: int) -> dict[str, float]:
        """Test accuracy and loss over every rank's slice (one all-reduce of 3 float64), logged."""
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
        """The summary (collective: the task diff and the kind's outputs); rank 0 writes and prints it."""
        cfg, sync, mask = self.cfg, self.sync, self.mask
        summary = {
            **sync.stats(), "task": self.task.name, "mask": "unused" if self.unused_mask else self.kind.name, "schedule": self.schedule.name,
            "world_size": self.world, "backend": cfg.cluster.backend, "steps": self.schedule.steps,
            "dense_steps": 0 if self.kind.dense else self.schedule.dense_steps,
            "numel": sum(p.numel() for p in self.model.parameters()),
            "k": mask.num_selected if mask is not None else None, "density": mask.density if mask is not None else 1.0,
            "mask_digest": mask.digest() if mask is not None else None,
            "test_acc": final["test_acc"], "test_loss": final["test_loss"],
            "wall_s": time.time() - self.t0, "train_s": train_s,
            "bytes_sent": sync.bytes_sent, "dense_bytes": sync.dense_bytes,
            "ratio": sync.bytes_sent / sync.dense_bytes if sync.dense_bytes else float("nan"),
            "mask_score_bytes": self.kind.score_bytes, "buffer_bytes": self.buffer_bytes_per_step * self.schedule.steps,
            "run_dir": self.run_dir,
            "skipped_steps": self.nonfinite.skipped, "resumed_from": self.resumed_from,
        }
        if self.task_diff is not None and cfg.save_diff:
            summary.update(self.task_diff.write(self.model, self.run_dir))  # rank 0 writes it
            if summary.get("task_diff_skipped"):
                self.log.info(f"task diff not written: {summary['task_diff_skipped']}")
        summary.update(self.kind.outputs(self))  # diff pruning's L0 phase, the width core alone (collective)
        self.log.log("summary", self.schedule.steps, **summary)
        if sdist.is_main_process():
            publish(summary, self.model if cfg.save_model else None, self.run_dir, cfg.cluster, self.log)
        self.log.close()
        return summary

    def close(self) -> None:
        """Close the logger and drop the DDP wrapper, its hook and the optimizers (see ``leave_process_group``)."""
        self.log.close()
        self.ddp = self.sync = self.dense_opt = self.sparse_opt = self.engine = None


class _WithoutDigest:
    """A masked optimizer's state without its mask digest (the checkpoint's ``mask`` holds it once)."""

    def __init__(self, part: Attr):
        self.part = part

    def state_dict(self) -> dict[str, Any] | None:
        sd = self.part.state_dict()
        return None if sd is None else {k: v for k, v in sd.items() if k != "mask_digest"}

    def load_state_dict(self, sd: dict[str, Any] | None) -> None:
        self.part.load_state_dict(sd)


def save_mask(mask: Mask, run_dir: str) -> str:
    """Rank 0: ``mask.safetensors`` (one byte per entry); returns the mask's digest."""
    path = os.path.join(run_dir, "mask.safetensors")
    with writes.writing(path, needed=mask.numel):
        return mask.save(path)


def write_config(cfg: DictConfig, run_dir: str) -> None:
    """Rank 0: ``config.yaml``, the resolved config (a cut one is told apart at the next start:
    :func:`sparsecomm.app.rundir.read_config_record`)."""
    path = os.path.join(run_dir, "config.yaml")
    text = OmegaConf.to_yaml(cfg, resolve=True).encode()
    with writes.writing(path, needed=len(text)), open(path, "wb") as f:
        f.write(text)


def _mask_kind(cfg: DictConfig, setting: Setting):
    """``(kind, unused)``: the mask kind, or the dense one when ``comm`` sends every entry
    (then ``unused`` names the configured kind)."""
    kind = build_mask_kind(cfg.mask, setting)
    if uses_mask(cfg.comm) or kind.dense:
        return kind, None
    return build_mask_kind(OmegaConf.create({"name": "dense"}), setting), kind.name


def _assert_same_config(digest: str) -> None:
    """Collective: stop, listing every rank's hash, unless all ranks run the same config."""
    sdist.assert_same_on_all_ranks(digest, "config hash", fix="Start every rank with the same config and overrides.")


def run(cfg: DictConfig, run_dir: str, t0: float | None = None) -> dict[str, Any]:
    """Every rank's whole life: join the process group, train, leave. Returns the summary.

    SIGINT/SIGTERM/SIGHUP stop the run at a step boundary (:class:`sparsecomm.app.fault.StopOnSignal`).
    A peer that stops answering for ``cluster.timeout_s`` raises :class:`sparsecomm.app.peers.PeerLost`.
    """
    stop = fault.StopOnSignal()
    trainer = heartbeat = None
    try:
        device = launch.init_process_group(cfg.cluster)  # bounded by cluster.timeout_s, so inside the try
        heartbeat = peers.Heartbeat.start(cfg.cluster)
        trainer = Trainer(cfg, run_dir, device, t0, stop=stop)
        return trainer.fit()
    except Exception as e:
        if not peers.is_peer_failure(e):
            raise
        done = trainer.step if trainer is not None else None
        total = trainer.schedule.steps if trainer is not None else int(cfg.steps)
        raise peers.lost(e, heartbeat, cfg.cluster, done=done, total=total,
                         run_dir=trainer.run_dir if trainer is not None else run_dir,
                         checkpoint=cfg.checkpoint) from None
    finally:
        if heartbeat is not None:
            heartbeat.stop()
        if trainer is not None:
            trainer.close()
        del trainer
        launch.leave_process_group()
        stop.restore()
