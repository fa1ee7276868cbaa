"""The trainer: one config builds the components; the trainer wires them and runs the steps.

    data.ShardedData           this rank's shard, its Fisher batches, its slice of the test set
    masks.MaskKind             mask/: builds the shared mask and takes part in steps (masks/*.py)
    gradient_sync.GradientSync DDP with the masked all-reduce hook (or plain DDP); bytes sent
    optimizers                 optim/: torch's dense AdamW/SGD, the library's masked ones
    engine.StepEngine          the one step: forward, backward (the hook syncs), update
    checkpointing.CheckpointManager  the run's checkpoints: components by name (run_state.components)

What crosses the network per step is the hook's (:mod:`sparsecomm.hook`); the trainer adds one
all-reduce of 3 float64 per log line (loss sum, steps, stop requests) and of 3 per evaluation.
Rank 0 alone writes into the run directory: ``config.yaml``, ``log.txt``, ``metrics.jsonl``,
``mask.safetensors``, ``model.safetensors``, ``task_diff.safetensors`` (masked runs) and, last,
``summary.json``. Ranks compare the config hash and the mask digest at start, after a resume
and after every mask.
"""
from __future__ import annotations

import copy
import os
import time
from collections.abc import Iterable
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from sparsecomm import distributed as sdist
from sparsecomm.mask import Mask

from . import launch, peers, signals, writes
from .callbacks import Callback, Callbacks
from .changes import ChangeApplier
from .checkpointing import CheckpointManager, TrainingHeader
from .config import config_hash
from .data import build_data, build_task, evaluate_run
from .engine import StepEngine
from .masks import Setting, build_mask_kind
from .masks.base import Comparison, MaskKind, View
from .masks.dense import DenseKind
from .metrics import make_logger
from .monitor import TrainMonitor, log_mask, log_skipped, log_start
from .nonfinite import NonFiniteGuard
from .report import publish
from .run_state import MaskState, Progress, RankBuffers, components, resume_notes
from .schedule import LRSchedule, Schedule
from .summary import run_summary
from .task_diff import TaskDiffRecorder
from .train_state import TrainState, buffer_bytes, new_state, use_mask

class Trainer:
    """Builds a run from ``cfg`` on an initialised process group and trains it (:meth:`fit`)."""

    def __init__(self, cfg: DictConfig, run_dir: str, device: torch.device, t0: float | None = None,
                 stop: signals.StopOnSignal | None = None, callbacks: Iterable[Callback] = ()):
        self.t0 = time.time() if t0 is None else t0
        self.stop = stop if stop is not None else signals.StopOnSignal(install=False)
        self.cfg, self.device = cfg, device
        self.rank, self.world = sdist.rank(), sdist.world_size()
        self.run_dir = sdist.gather_strings(os.path.abspath(run_dir))[0]  # rank 0's is the run's
        self.config_hash = config_hash(cfg)  # of the training config: ranks, checkpoints and resumes compare it
        _assert_same_config(self.config_hash)
        torch.manual_seed(cfg.seed)  # same initial model on every rank (DDP broadcasts rank 0's anyway)
        self.task = build_task(cfg.task)
        self.data = build_data(self.task, cfg, device)
        model = self.task.model.to(device)
        self.kind = build_mask_kind(cfg.mask, Setting(self.task, self.data, model, cfg.seed, cfg.optim))
        self.schedule = self.kind.plan(Schedule.from_config(cfg.schedule, cfg.steps, cfg.seed, masked=not self.kind.dense))
        self.lr_schedule = LRSchedule.from_config(cfg.schedule.lr, cfg.steps)
        self.nonfinite = NonFiniteGuard(cfg.nonfinite.max_in_a_row)
        self.state = new_state(cfg, model, device, masked=not self.kind.dense, nonfinite=self.nonfinite)
        self.buffer_bytes_per_step = buffer_bytes(model, cfg.comm, self.world)
        self.task_diff = None if self.kind.dense else TaskDiffRecorder(template=model)
        torch.manual_seed(cfg.seed + 1 + self.rank)  # dropout etc. differ per rank from here on
        header = TrainingHeader(cfg, self.config_hash, lambda: self.state.model)
        self.checkpoints = CheckpointManager(cfg.checkpoint, self.run_dir, header=header, validate=header.validate,
                                             prepare=self.before_load)  # its states: below
        self.checkpoints.check_writable()  # now, not at the first checkpoint
        self.callbacks = Callbacks(callbacks)
        self.engine = StepEngine(self.task.loss_fn, timed=self.callbacks.wants_step_times)
        self.resumed_from: str | None = None
        self.log = make_logger(cfg.logging, self.run_dir, cfg.steps, config=OmegaConf.to_container(cfg, resolve=True))
        self.apply = ChangeApplier(cfg, device, self.kind, self.log, self.task_diff, model)
        self.monitor = TrainMonitor(self.log, self.stop, device, every=cfg.logging.log_every, state=self.state,
                                    dense_at=lambda s: self.kind.dense or self.schedule.sends_dense(s),
                                    lr_factor=self.lr_schedule.factor)
        self.progress = Progress(self.data, int(cfg.batch_size), self.monitor, int(cfg.seed), lambda: self.state.step,
                                 lambda: self.state.sync.bytes_sent)
        self.rank_buffers = RankBuffers(lambda: self.state.model)
        mask = MaskState(lambda: self.state.mask, lambda m: use_mask(self.state, m, cfg.optim, validate=True))
        self.checkpoints.states.update(components(
            self.state, buffers=self.rank_buffers, mask=mask, kind=self.kind, progress=self.progress,
            nonfinite=self.nonfinite, task_diff=self.task_diff))
        log_start(self.log, self.task.name, self.kind.name, self.schedule.name, model, self.world, cfg.cluster.backend,
                  device, self.run_dir)

    model = property(lambda self: self.state.model, doc="The model trained now (the state's).")
    mask = property(lambda self: self.state.mask, doc="The mask trained with now, or None (the state's).")
    step = property(lambda self: self.state.step, doc="Steps done (the state's).")

    # -- steps -----------------------------------------------------------------------------------
    def train_step(self, step: int) -> torch.Tensor:
        """The run's step ``step`` (:meth:`step_of` its state). Returns the local loss."""
        return self.step_of(self.state, self.data, self.kind, step)

    def step_of(self, state: TrainState, data, kind: MaskKind, step: int) -> torch.Tensor:
        """One step of ``state`` on ``data``: the kind's changes before it, the engine's step (the
        hook syncs), the kind's after it. Returns the local loss."""
        dense = self.before_step(state, kind, step)
        optimizer, base_lr = state.optimizer(dense)
        loss = self.engine.step(state.ddp, data.next_batch(), optimizer, base_lr * self.lr_schedule.factor(step),
                                sync=state.sync, nonfinite=state.nonfinite, step=step, extra_loss=kind.extra_loss,
                                after_backward=lambda: kind.after_backward(self.view(state, step, dense)))
        if self.engine.last_skipped:
            log_skipped(self.log, state.nonfinite, step)
        self.apply(state, kind.after_step(self.view(state, step, dense)), step)
        state.step = step + 1
        return loss

    def before_step(self, state: TrainState, kind: MaskKind, step: int) -> bool:
        """The schedule and the kind before ``step``: a new mask when due, dense or masked. True: dense."""
        if kind.dense:
            return True
        if self.schedule.mask_due(step):
            self.new_mask(state, step)
        dense = self.schedule.sends_dense(step)
        if self.task_diff is not None and self.schedule.is_full_step(step):
            self.task_diff.full_step(step)
        change = kind.before_step(self.view(state, step, dense))  # diff pruning may swap the model here
        self.apply(state, change, step)
        dense = dense if change is None or change.dense is None else change.dense
        state.sync.set_dense(dense)
        return dense

    def new_mask(self, state: TrainState, step: int) -> None:
        """The kind's mask for ``step`` (collective), applied; rank 0 saves it and logs it."""
        t = time.perf_counter()
        self.apply(state, self.kind.new_mask(self.view(state, step, dense=False)), step)
        mask = state.mask
        _assert_same_config(self.config_hash)
        digest = save_mask(mask, self.run_dir) if sdist.is_main_process() else mask.digest()
        log_mask(self.log, self.kind.name, mask, digest, step, time.perf_counter() - t)

    def view(self, state: TrainState, step: int, dense: bool) -> View:
        """What a kind reads at ``step`` of ``state``."""
        return View(state.model, step, dense, state.sync.bytes_sent, state.sync.grad_bytes, self.task, self.data,
                    self.device)

    # -- checkpoints -----------------------------------------------------------------------------
    def before_load(self, header: dict[str, Any]) -> None:
        """Before a checkpoint's components load: its step; the kind's model for that step (diff pruning's L0 phase)."""
        step = int(header["step"])
        self.apply(self.state, self.kind.before_load(self.view(self.state, step, dense=False)), step)
        self.state.step = step

    def save_checkpoint(self) -> str | None:
        """Collective: every rank calls it at the same step; rank 0 writes. Returns the path on rank 0."""
        t = time.perf_counter()
        path = self.checkpoints.save(self.step)
        if path is not None:
            self.log.log("checkpoint", self.step, path=path, seconds=round(time.perf_counter() - t, 3))
        return path

    def resume(self) -> bool:
        """Load the checkpoint ``checkpoint.resume`` names (auto: the newest valid one), if any.
        Collective: ranks check they agree on the config and the mask afterwards."""
        found = self.checkpoints.resume()
        if found is None:
            return False
        step, path, header = found
        for line in resume_notes(header, self.progress, self.rank_buffers):
            self.log.info(line)
        _assert_same_config(self.config_hash)
        sdist.assert_same_on_all_ranks(self.mask.digest() if self.mask is not None else "none", "mask digest",
                                       fix="Every rank must load the same checkpoint.")
        self.resumed_from = path
        if self.mask is not None and sdist.is_main_process():
            save_mask(self.mask, self.run_dir)  # the run dir may be a new one
        dropped = self.log.rewind(step)  # the crashed run's records past this checkpoint: re-done now
        saved_world = int(header["world_size"])
        self.log.log("resume", step, path=path, world_size=self.world, saved_world_size=saved_world,
                     resharded=saved_world != self.world, dropped_records=dropped)
        self.log.info(f"resumed from {path} at step {step} (written by {saved_world} ranks)")
        return True

    def _interrupted(self, done: int, total: int) -> signals.Interrupted:
        """Every rank stops after step ``done`` on a signal: a checkpoint if they are on (unless one was
        written at this step), a log record, and the :class:`~sparsecomm.app.signals.Interrupted` to raise."""
        on = self.checkpoints.every > 0
        if on and not self.checkpoints.written_at(done):
            self.save_checkpoint()
        stopped = signals.interrupted(self.stop.signum, done, total, self.checkpoints.last_path, on)
        self.log.log("interrupted", done, signal=signals.signal_name(stopped.signum), checkpoint=self.checkpoints.last_path)
        return stopped

    # -- the loop --------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Resume if a checkpoint says so, train to the last step, evaluate, report. Returns the summary."""
        cfg, steps = self.cfg, self.schedule.steps
        if not self.resume():  # per checkpoint.resume; without a checkpoint the run starts at step 0
            self.log.rewind(0)  # (a restarted job: its first attempt's records go)
        if sdist.is_main_process():  # only now: a refused resume leaves the folder's record as it was
            write_config(cfg, self.run_dir)
        self.callbacks.on_train_start(self.state)
        self.monitor.start()
        start = time.perf_counter()
        for step in range(self.step, steps):
            loss = self.train_step(step)
            done = step + 1
            self.callbacks.on_step_end(self.state, done, loss, self.engine.last_times)
            stop = self.monitor.after_step(done, loss, self.engine.last_skipped, done == steps, self.world)
            if cfg.eval_every and done % cfg.eval_every == 0 and done != steps:
                self.evaluate(done)
            if self.checkpoints.due(done, steps):
                self.save_checkpoint()
            if stop and done < steps:  # every rank at the same step
                raise self._interrupted(done, steps)
        train_s = time.perf_counter() - start
        return self.finish(self.evaluate(steps), train_s)

    def evaluate(self, done: int) -> dict[str, float]:
        """Test accuracy and loss over every rank's slice (one all-reduce of 3 float64), logged."""
        result = evaluate_run(self.model, self.data, self.task.loss_fn, self.device,
                              rank0_buffers=self.buffer_bytes_per_step > 0)
        self.log.log("eval", done, **result)
        self.log.info(f"step {done}: test accuracy {result['test_acc']:.4f}, loss {result['test_loss']:.4f}")
        self.callbacks.on_eval(self.state, done, result)
        return result

    def finish(self, final: dict[str, float], train_s: float) -> dict[str, Any]:
        """The summary (collective: the task diff, the kind's outputs); rank 0 writes and prints it."""
        summary = run_summary(self.cfg, self.state, self.kind, self.schedule, task=self.task.name, world=self.world,
                              final=final, t0=self.t0, train_s=train_s, buffer_bytes_per_step=self.buffer_bytes_per_step,
                              run_dir=self.run_dir, resumed_from=self.resumed_from)
        if self.task_diff is not None and self.cfg.save_diff:
            summary.update(self.task_diff.write(self.model, self.run_dir))  # rank 0 writes it
            if summary.get("task_diff_skipped"):
                self.log.info(f"task diff not written: {summary['task_diff_skipped']}")
        outputs = self.kind.outputs(self.view(self.state, self.schedule.steps, dense=False))  # collective
        self.apply(self.state, outputs, self.schedule.steps)
        summary.update(outputs.fields)
        if outputs.compare is not None:
            summary.update(self.compare(outputs.compare))
        summary.update(self.callbacks.on_train_end(self.state, summary))
        self.log.log("summary", self.schedule.steps, **summary)
        if sdist.is_main_process():
            publish(summary, self.model if self.cfg.save_model else None, self.run_dir, self.cfg.cluster, self.log)
        self.log.close()
        return summary

    def compare(self, c: Comparison) -> dict[str, Any]:
        """Train ``c.model`` alone through :meth:`step_of` (plain DDP, the dense optimizer, the run's
        lr schedule and steps, a fresh stream of the same batches), evaluate it (collective)."""
        model = copy.deepcopy(c.model).to(self.device).train()
        state = new_state(self.cfg, model, self.device, masked=False, dense_lr=c.lr)
        data, plain = build_data(self.task, self.cfg, self.device), DenseKind({"always": []}, self.kind.setting)
        for step in range(self.schedule.steps):
            self.step_of(state, data, plain, step)
        res = evaluate_run(model, data, self.task.loss_fn, self.device, rank0_buffers=False)
        self.log.info(f"{c.label} ({self.schedule.steps} steps, lr {state.dense_lr:g}): "
                      f"test accuracy {res['test_acc']:.4f}")
        return {f"{c.prefix}_acc": res["test_acc"], f"{c.prefix}_loss": res["test_loss"],
                f"{c.prefix}_bytes": state.sync.bytes_sent, f"{c.prefix}_lr": state.dense_lr}

    def close(self) -> None:
        """Close the logger and drop the DDP wrapper, its hook and the optimizers (see ``leave_process_group``)."""
        self.log.close()
        self.apply.close()
        self.state.sync = self.state.dense_opt = self.state.sparse_opt = None


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


def _assert_same_config(digest: str) -> None:
    """Collective: stop, listing every rank's hash, unless all ranks run the same config."""
    sdist.assert_same_on_all_ranks(digest, "config hash", fix="Start every rank with the same config and overrides.")


def run(cfg: DictConfig, run_dir: str, t0: float | None = None, callbacks: Iterable[Callback] = ()) -> dict[str, Any]:
    """Every rank's whole life: join the process group, train, leave. Returns the summary.
    ``callbacks``: measurement hooks (:class:`~sparsecomm.app.callbacks.Callback`), on every rank.

    SIGINT/SIGTERM/SIGHUP stop the run at a step boundary (:class:`sparsecomm.app.signals.StopOnSignal`).
    A peer that stops answering for ``cluster.timeout_s`` raises :class:`sparsecomm.app.peers.PeerLost`.
    """
    stop = signals.StopOnSignal()
    trainer = heartbeat = None
    try:
        device = launch.init_process_group(cfg.cluster)  # bounded by cluster.timeout_s, so inside the try
        heartbeat = peers.Heartbeat.start(cfg.cluster)
        trainer = Trainer(cfg, run_dir, device, t0, stop=stop, callbacks=callbacks)
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
