"""The train log: the loss window, the log line every ``logging.log_every`` steps, and stop requests.

Each log line costs one all-reduce of 3 float64 (the loss sum, the steps in the window, and the
number of ranks that got a stop signal, :class:`sparsecomm.app.signals.StopOnSignal`): the ranks
agree there, so they all stop at the same step. Nothing else crosses the network.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from sparsecomm import distributed as sdist

from .metrics import human_bytes


class TrainMonitor:
    """Sums this rank's loss between log lines and writes them (rank 0) with the bytes sent.

    ``state``: the run's :class:`~sparsecomm.app.train_state.TrainState` (its sync, read at each
    line: diff pruning swaps it; its non-finite guard's skipped steps); ``dense_at(step)`` whether
    ``step`` sent dense gradients; ``lr_factor(step)`` the lr schedule.
    """

    def __init__(self, log, stop, device: torch.device, *, every: int, state, dense_at: Callable[[int], bool],
                 lr_factor: Callable[[int], float]):
        self.log, self.stop, self.every = log, stop, max(int(every), 1)
        self.state, self.dense_at, self.lr_factor = state, dense_at, lr_factor
        self.window = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, steps since the last log
        self.mark: tuple[int, int] = (0, 0)  # (step, bytes sent) at the last train log
        self._clock = time.perf_counter()

    def start(self) -> None:
        self._clock = time.perf_counter()

    def after_step(self, done: int, loss: torch.Tensor, skipped: bool, last: bool, world: int) -> bool:
        """Record the step that made ``done`` steps; log when due. True: stop at this step."""
        if not skipped:
            self.window += torch.stack([loss.double(), self.window.new_ones(())])
        self.log.progress(done)
        if done % self.every == 0 or last:
            return self._log(done)
        return self.stop.requested and world == 1

    def _log(self, done: int) -> bool:
        reduced = torch.cat([self.window, self.window.new_tensor([float(self.stop.requested)])])
        if sdist.is_initialized():
            dist.all_reduce(reduced)
        loss = (reduced[0] / reduced[1].clamp(min=1)).item()
        now, sync = time.perf_counter(), self.state.sync
        steps = max(done - self.mark[0], 1)
        per_step = (sync.bytes_sent - self.mark[1]) / steps
        self.log.log("train", done, loss=loss, steps_per_s=steps / max(now - self._clock, 1e-9),
                     bytes_per_step=per_step, bytes_sent=sync.bytes_sent, dense_bytes=sync.dense_bytes,
                     lr_factor=self.lr_factor(done - 1), dense=self.dense_at(done - 1),
                     skipped_steps=self.state.nonfinite.skipped)
        self.log.progress(done, loss=f"{loss:.4f}", sent=f"{human_bytes(per_step)}/step")
        self._clock, self.mark = now, (done, sync.bytes_sent)
        self.window.zero_()
        return bool(reduced[2] > 0)


def log_start(log, task: str, kind, schedule: str, model: torch.nn.Module, backend: str, run_dir: str) -> None:
    """The run's first log line: what trains (on the device of ``model``), on how many ranks, where it
    writes; then the mask kind's notes."""
    device = next(model.parameters()).device
    log.info(f"sparsecomm: task={task} ({sum(p.numel() for p in model.parameters()):,} parameters), mask={kind.name}, "
             f"schedule={schedule}, {sdist.world_size()} ranks ({backend}, {device.type}), run dir {run_dir}")
    for line in kind.notes():
        log.info(line)


def log_skipped(log, guard, step: int) -> None:
    """A step the non-finite guard skipped (every rank alike)."""
    log.log("nonfinite", step + 1, skipped=guard.skipped, in_a_row=guard.in_a_row)
    log.info(f"step {step}: the all-reduced gradient holds NaN/Inf; step skipped on every rank "
             f"({guard.in_a_row} in a row, {guard.skipped} in all)")


def timed(fn, *args):
    """``fn(*args)`` and the seconds it took: ``(result, seconds)``."""
    began = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - began


def log_mask(log, kind: str, mask, digest: str, step: int, seconds: float) -> None:
    """A new mask: its record in ``metrics.jsonl`` and its log line."""
    log.log("mask", step, kind=kind, k=mask.num_selected, numel=mask.numel, density=mask.density, digest=digest,
            seconds=round(seconds, 3))
    log.info(f"step {step}: {kind} mask, k={mask.num_selected:,} of {mask.numel:,} "
             f"(density {mask.density:.4g}), digest {digest[:12]}, {seconds:.1f} s")


def log_resume(log, step: int, path: str, header, notes: list[str]) -> None:
    """A resume: what it does not carry over exactly (``notes``), the crashed run's records past
    ``step`` dropped from the log (they are re-done), its record and line."""
    for line in notes:
        log.info(line)
    dropped = log.rewind(step)
    saved_world = int(header["world_size"])
    log.log("resume", step, path=path, world_size=sdist.world_size(), saved_world_size=saved_world,
            resharded=saved_world != sdist.world_size(), dropped_records=dropped)
    log.info(f"resumed from {path} at step {step} (written by {saved_world} ranks)")


def log_eval(log, done: int, result, seconds: float) -> None:
    """An evaluation after ``done`` steps that took ``seconds``: its record and line (the record's
    ``seconds`` let a reader take evaluation out of the run's clock: time to an accuracy)."""
    log.log("eval", done, **result, seconds=round(seconds, 3))
    log.info(f"step {done}: test accuracy {result['test_acc']:.4f}, loss {result['test_loss']:.4f}")


def log_checkpoint(log, step: int, path: str | None, seconds: float) -> None:
    """A checkpoint rank 0 wrote (``path`` None on the other ranks: nothing to record)."""
    if path is not None:
        log.log("checkpoint", step, path=path, seconds=round(seconds, 3))
