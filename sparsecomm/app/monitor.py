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

    ``sync()`` returns the current gradient sync (it changes when diff pruning swaps the model);
    ``dense_at(step)`` whether ``step`` sent dense gradients; ``lr_factor(step)`` the lr schedule.
    """

    def __init__(self, log, stop, device: torch.device, *, every: int, sync: Callable, dense_at: Callable[[int], bool],
                 lr_factor: Callable[[int], float], skipped: Callable[[], int]):
        self.log, self.stop, self.every = log, stop, max(int(every), 1)
        self.sync, self.dense_at, self.lr_factor, self.skipped = sync, dense_at, lr_factor, skipped
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
        now, sync = time.perf_counter(), self.sync()
        steps = max(done - self.mark[0], 1)
        per_step = (sync.bytes_sent - self.mark[1]) / steps
        self.log.log("train", done, loss=loss, steps_per_s=steps / max(now - self._clock, 1e-9),
                     bytes_per_step=per_step, bytes_sent=sync.bytes_sent, dense_bytes=sync.dense_bytes,
                     lr_factor=self.lr_factor(done - 1), dense=self.dense_at(done - 1), skipped_steps=self.skipped())
        self.log.progress(done, loss=f"{loss:.4f}", sent=f"{human_bytes(per_step)}/step")
        self._clock, self.mark = now, (done, sync.bytes_sent)
        self.window.zero_()
        return bool(reduced[2] > 0)
