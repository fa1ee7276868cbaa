"""The trainer: one config builds the components; the trainer wires them and runs the steps.

    data.ShardedData           this rank's shard, its Fisher batches, its slice of the test set
    masks.MaskKind             mask/: builds the shared mask; at each point of a step it reads a
                               View and returns a Change (masks/*.py)
    train_state.TrainState     the run's one mutable state: model, sync (comm/: DDP and its hook,
                               comm.build_comm), optimizers (optim/), mask, step
    changes.KindSteps          the schedule and the kind around each step; ChangeApplier applies
                               what the kind returns
    engine.StepEngine          the one step: forward, backward (the hook syncs), update
    callbacks.Callback         measurement hooks (step times, bytes, evaluations, summary fields)
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

from . import launch, peers, signals, writes
from .callbacks import Callback, Callbacks
from .changes import KindSteps, assert_same_config
from .checkpointing import CheckpointManager, TrainingHeader
from .comm import uses_mask
from .config import config_hash
from .data import build_data, build_task, evaluate_run
from .engine import StepEngine
from .masks import Setting, build_mask_kind
from .masks.base import Comparison
from .metrics import make_logger
from .monitor import TrainMonitor, log_checkpoint, log_eval, log_resume, log_skipped, log_start, timed
from .nonfinite import NonFiniteGuard
from .report import publish
from .run_state import Progress, RankBuffers, components, resume_notes
from .schedule import LRSchedule, Schedule
from .summary import run_summary
from .train_state import TrainState, buffer_bytes, new_state


class Trainer:
    """Builds a run from ``cfg`` on an initialised process group and trains it (:meth:`fit`)."""

    def __init__(self, cfg: DictConfig, run_dir: str, device: torch.device, t0: float | None = None,
                 stop: signals.StopOnSignal | None = None, callbacks: Iterable[Callback] = ()):
        self.t0, self.stop = time.time() if t0 is None else t0, stop or signals.StopOnSignal(install=False)
        self.cfg, self.device, self.world = cfg, device, sdist.world_size()
        self.run_dir = sdist.gather_strings(os.path.abspath(run_dir))[0]  # rank 0's is the run's
        self.config_hash = config_hash(cfg)  # of the training config: ranks, checkpoints and resumes compare it
        assert_same_config(self.config_hash)
        torch.manual_seed(cfg.seed)  # same initial model on every rank (DDP broadcasts rank 0's anyway)
        self.task = build_task(cfg.task)
        self.data = build_data(self.task, cfg, device)
        model = self.task.model.to(device)
        self.kind = build_mask_kind(cfg.mask, Setting(self.task, self.data, model, cfg.seed, cfg.optim),
                                    comm=None if uses_mask(cfg.comm) else cfg.comm.name)
        self.schedule = self.kind.plan(Schedule.from_config(cfg.schedule, cfg.steps, cfg.seed, masked=not self.kind.dense))
        self.lr_schedule = LRSchedule.from_config(cfg.schedule.lr, cfg.steps)
        self.state = new_state(cfg, model, device, masked=not self.kind.dense,
                               nonfinite=NonFiniteGuard(cfg.nonfinite.max_in_a_row))
        self.buffer_bytes_per_step = buffer_bytes(model, cfg.comm, self.world)
        torch.manual_seed(cfg.seed + 1 + sdist.rank())  # dropout etc. differ per rank from here on
        header = TrainingHeader(cfg, self.config_hash, lambda: self.state.model)
        self.checkpoints = CheckpointManager(cfg.checkpoint, self.run_dir, header=header, validate=header.validate,
                                             prepare=lambda h: self.kind_steps.before_load(self.state, h))
        self.checkpoints.check_writable()  # now, not at the first checkpoint
        self.callbacks = Callbacks(callbacks)
        self.engine = StepEngine(self.task.loss_fn, timed=self.callbacks.wants_step_times)
        self.resumed_from: str | None = None
        self.log = make_logger(cfg.logging, self.run_dir, cfg.steps, config=OmegaConf.to_container(cfg, resolve=True))
        self.kind_steps = KindSteps.build(cfg, self.kind, self.schedule, model, (self.task, self.data, device),
                                          self.log, run_dir=self.run_dir, config_hash=self.config_hash)
        self.monitor = TrainMonitor(self.log, self.stop, device, every=cfg.logging.log_every, state=self.state,
                                    dense_at=self.kind_steps.sends_dense, lr_factor=self.lr_schedule.factor)
        self.progress = Progress(self.data, int(cfg.batch_size), self.monitor, int(cfg.seed), lambda: self.state.step,
                                 lambda: self.state.sync.bytes_sent)
        self.rank_buffers = RankBuffers(lambda: self.state.model)
        self.checkpoints.states.update(components(
            self.state, buffers=self.rank_buffers, mask=self.kind_steps.mask_state(self.state), kind=self.kind,
            progress=self.progress, nonfinite=self.state.nonfinite, task_diff=self.kind_steps.task_diff))
        log_start(self.log, self.task.name, self.kind, self.schedule.name, model, cfg.cluster.backend, self.run_dir)

    model = property(lambda self: self.state.model, doc="The model trained now (the state's).")
    mask = property(lambda self: self.state.mask, doc="The mask trained with now, or None (the state's).")
    step = property(lambda self: self.state.step, doc="Steps done (the state's).")

    def train_step(self, step: int) -> torch.Tensor:
        """The run's step ``step``; returns the local loss."""
        return self.step_of(self.state, self.data, self.kind_steps, step)

    def step_of(self, state: TrainState, data, steps: KindSteps, step: int) -> torch.Tensor:
        """One step of ``state`` on ``data``: the kind's part, the engine's step (the hook syncs), the kind's part."""
        dense = steps.before(state, step)
        optimizer, base_lr = state.optimizer(dense)
        loss = self.engine.step(state.ddp, data.next_batch(), optimizer, base_lr * self.lr_schedule.factor(step),
                                sync=state.sync, nonfinite=state.nonfinite, step=step, extra_loss=steps.kind.extra_loss,
                                after_backward=lambda: steps.after_backward(state, step, dense),
                                after_update=state.sync.after_update)
        if self.engine.last_skipped:
            log_skipped(self.log, state.nonfinite, step)
        steps.after(state, step, dense)
        state.step = step + 1
        return loss

    def save_checkpoint(self) -> str | None:
        """Collective: every rank calls it at the same step; rank 0 writes. Returns the path on rank 0."""
        path, seconds = timed(self.checkpoints.save, self.step)
        log_checkpoint(self.log, self.step, path, seconds)
        return path

    def resume(self) -> bool:
        """Load the checkpoint ``checkpoint.resume`` names (auto: the newest valid one), if any (collective)."""
        found = self.checkpoints.resume()
        if found is None:
            return False
        step, self.resumed_from, header = found
        self.kind_steps.after_load(self.state)
        log_resume(self.log, step, self.resumed_from, header, resume_notes(header, self.progress, self.rank_buffers))
        return True

    def _interrupted(self, done: int, total: int) -> signals.Interrupted:
        """Every rank stops after step ``done`` on a signal: a checkpoint if none is, a record, the error to raise."""
        if self.checkpoints.every > 0 and not self.checkpoints.written_at(done):
            self.save_checkpoint()
        stopped = signals.interrupted(self.stop.signum, done, total, self.checkpoints.last_path, self.checkpoints.every > 0)
        self.log.log("interrupted", done, signal=signals.signal_name(stopped.signum), checkpoint=self.checkpoints.last_path)
        return stopped

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
        result, seconds = timed(evaluate_run, self.model, self.data, self.task.loss_fn, self.device,
                                self.buffer_bytes_per_step > 0)
        log_eval(self.log, done, result, seconds)
        self.callbacks.on_eval(self.state, done, result)
        return result

    def finish(self, final: dict[str, float], train_s: float) -> dict[str, Any]:
        """The summary (collective: the task diff, the kind's outputs); rank 0 writes and prints it."""
        summary = run_summary(self.cfg, self.state, self.kind, self.schedule, final, train_s, self.task.name, self.t0,
                              self.buffer_bytes_per_step, run_dir=self.run_dir, resumed_from=self.resumed_from)
        outputs = self.kind_steps.outputs(self.state, save_diff=self.cfg.save_diff)  # collective
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
        """Train ``c.model`` alone through :meth:`step_of` on a fresh stream of the same batches; evaluate it."""
        model, data = copy.deepcopy(c.model).to(self.device).train(), build_data(self.task, self.cfg, self.device)
        state, plain = new_state(self.cfg, model, self.device, masked=False, dense_lr=c.lr), self.kind_steps.plain(data)
        for step in range(self.schedule.steps):
            self.step_of(state, data, plain, step)
        result = evaluate_run(state.model, data, self.task.loss_fn, self.device, False)
        self.log.info(c.line(result, self.schedule.steps, state.dense_lr))
        return c.fields(result, state.sync.bytes_sent, state.dense_lr)

    def close(self) -> None:
        """Close the logger and drop the DDP wrapper, its hook and the optimizers (see ``leave_process_group``)."""
        self.log.close()
        self.kind_steps.apply.close()
        self.state.sync = self.state.dense_opt = self.state.sparse_opt = None


def write_config(cfg: DictConfig, run_dir: str) -> None:
    """Rank 0: ``config.yaml``, the resolved config (a cut one is told apart at the next start:
    :func:`sparsecomm.app.rundir.read_config_record`)."""
    path = os.path.join(run_dir, "config.yaml")
    text = OmegaConf.to_yaml(cfg, resolve=True).encode()
    with writes.writing(path, needed=len(text)), open(path, "wb") as f:
        f.write(text)


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
        sdist.leave_process_group()
        stop.restore()
