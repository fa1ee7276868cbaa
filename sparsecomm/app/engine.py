"""The one training step of the project.

The trainer runs every step of a run (and of the comparison runs a mask kind asks for, such as
the width core trained alone) through :meth:`StepEngine.step`; the benchmarks drive the trainer,
so every benchmark measures the step users run.

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
    """Runs steps on ``loss_fn(outputs, targets)``; what it steps is passed per call (the trainer's
    :class:`~sparsecomm.app.train_state.TrainState` may swap its model and sync between steps).

    ``timed``: each step records the seconds of its forward, backward (with the all-reduce) and
    optimizer phases in :attr:`last_times` (synchronising CUDA between them); otherwise None.
    ``times`` (optional dict): each timed step also appends its phases' seconds there.
    """

    def __init__(self, loss_fn: Callable, *, timed: bool = False, times: dict[str, list[float]] | None = None):
        self.loss_fn, self.times = loss_fn, times
        self.timed = timed or times is not None
        self.last_skipped = False
        self.last_times: dict[str, float] | None = None

    def step(self, module: torch.nn.Module, batch: tuple[Any, Any], optimizer: torch.optim.Optimizer | None,
             lr: float | None = None, *, sync=None, nonfinite=None, step: int = 0,
             extra_loss: Callable[[], torch.Tensor | None] | None = None,
             after_backward: Callable[[], None] | None = None,
             after_update: Callable[[], None] | None = None) -> torch.Tensor:
        """One step of ``module`` (a DDP wrapper, or a bare model) on ``batch = (inputs, targets)``;
        returns this rank's loss (detached).

        ``optimizer`` None: forward and backward only (a benchmark's floor). ``lr``: set on every
        param group first (``lr_scale`` groups keep their ratio). ``sync`` (optional, the run's
        gradient sync) counts the bytes and answers whether the reduced gradient is finite;
        ``nonfinite`` (optional, the run's non-finite guard) then decides to skip the update (on
        every rank alike) and stops the run after too many in a row. ``extra_loss``: added to the
        loss before backward when it returns a tensor (diff pruning's L0 penalty); the returned
        loss is the task's. ``after_backward``: called after backward (the all-reduce done), before
        the optimizer. ``after_update``: called after the optimizer's update, while the gradients
        still exist (torch's post-local SGD averager averages the parameters that have one).
        """
        inputs, targets = batch
        if optimizer is not None and lr is not None:
            set_lr(optimizer, lr)
        clock = self._clock(module)
        loss = self.loss_fn(forward(module, inputs), targets)
        clock("forward")
        extra = extra_loss() if extra_loss is not None else None
        (loss if extra is None else loss + extra).backward()
        clock("backward")
        self.last_skipped = False
        if sync is not None:
            sync.after_backward()
            if nonfinite is not None:
                self.last_skipped = nonfinite.check(sync.found_nonfinite(module), step)
        if after_backward is not None:
            after_backward()
        if optimizer is not None:
            if not self.last_skipped:
                optimizer.step()
                if after_update is not None:
                    after_update()
            optimizer.zero_grad(set_to_none=True)
        else:
            module.zero_grad(set_to_none=True)
        clock("optimizer")
        return loss.detach()

    def _clock(self, module: torch.nn.Module) -> Callable[[str], None]:
        """A function that records the time since its last call under a phase name (if timed)."""
        self.last_times = None
        if not self.timed:
            return lambda phase: None
        cuda = next(module.parameters()).is_cuda
        last = [time.perf_counter()]
        self.last_times = times = {}

        def mark(phase: str) -> None:
            if cuda:
                torch.cuda.synchronize()
            now = time.perf_counter()
            times[phase] = now - last[0]
            if self.times is not None:
                self.times.setdefault(phase, []).append(now - last[0])
            last[0] = now
        return mark
