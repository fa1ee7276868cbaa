"""The one training step of the project.

The trainer, "train the width core alone" (``masks/width_core.py``) and the benchmark workers
(``benchmarks/worker.py``, ``tta_worker.py``, ``transfer_worker.py``) all run
:meth:`StepEngine.step`, so every benchmark measures the step users run.

A step, on every rank::

    lr -> forward(DDP module, this rank's batch) -> loss (+ the mask kind's extra term)
       -> backward: DDP's communication hook all-reduces the gradient while it runs
       -> gradient sync's counters -> NaN/Inf check of the reduced gradient -> optimizer -> zero_grad

What crosses the network is the hook's business and nothing else is sent: plain DDP sends the
``n`` gradient entries (``n x 4`` bytes in fp32), the masked hook (:mod:`sparsecomm.hook`) the
``k`` selected ones, PowerSGD its two factors, and so on. The NaN/Inf check reads the reduced
values only (the same verdict on every rank, no extra traffic).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from sparsecomm.modelio import forward

from .schedule import set_lr

PHASES = ("forward", "backward", "optimizer")


class StepEngine:
    """Runs steps of ``module`` (a DDP wrapper, or a bare model) on ``loss_fn(outputs, targets)``.

    ``sync`` (optional, :class:`~sparsecomm.app.gradient_sync.GradientSync`) counts the bytes and
    answers whether the reduced gradient is finite; ``nonfinite`` (optional,
    :class:`~sparsecomm.app.nonfinite.NonFiniteGuard`) then decides to skip the update (on every rank
    alike) and stops the run after too many in a row. ``times``: when a dict, each step appends
    the seconds of its forward, backward (with the all-reduce) and optimizer phases.
    """

    def __init__(self, module: torch.nn.Module, loss_fn: Callable, *, sync=None, nonfinite=None,
                 times: dict[str, list[float]] | None = None):
        self.module, self.loss_fn, self.sync, self.nonfinite = module, loss_fn, sync, nonfinite
        self.times = times
        self.last_skipped = False

    def step(self, batch: tuple[Any, Any], optimizer: torch.optim.Optimizer | None, lr: float | None = None, *,
             step: int = 0, extra_loss: Callable[[], torch.Tensor | None] | None = None,
             after_update: Callable[[], None] | None = None) -> torch.Tensor:
        """One step on ``batch = (inputs, targets)``; returns this rank's loss (detached).

        ``optimizer`` None: forward and backward only (a benchmark's floor). ``lr``: set on every
        param group first (``lr_scale`` groups keep their ratio). ``extra_loss``: added to the
        loss before backward when it returns a tensor (diff pruning's L0 penalty); the returned loss
        is the task's. ``after_update``: called after the optimizer's update, while the gradients
        still exist (torch's post-local SGD averager averages the parameters that have one).
        """
        inputs, targets = batch
        if optimizer is not None and lr is not None:
            set_lr(optimizer, lr)
        clock = self._clock()
        loss = self.loss_fn(forward(self.module, inputs), targets)
        clock("forward")
        extra = extra_loss() if extra_loss is not None else None
        (loss if extra is None else loss + extra).backward()
        clock("backward")
        self.last_skipped = False
        if self.sync is not None:
            self.sync.after_backward()
            if self.nonfinite is not None:
                self.last_skipped = self.nonfinite.check(self.sync.found_nonfinite(self.module), step)
        if optimizer is not None:
            if not self.last_skipped:
                optimizer.step()
                if after_update is not None:
                    after_update()
            optimizer.zero_grad(set_to_none=True)
        else:
            self.module.zero_grad(set_to_none=True)
        clock("optimizer")
        return loss.detach()

    def _clock(self) -> Callable[[str], None]:
        """A function that records the time since its last call under a phase name (if timing)."""
        if self.times is None:
            return lambda phase: None
        cuda = next(self.module.parameters()).is_cuda
        last = [time.perf_counter()]

        def mark(phase: str) -> None:
            if cuda:
                torch.cuda.synchronize()
            now = time.perf_counter()
            self.times.setdefault(phase, []).append(now - last[0])
            last[0] = now
        return mark
