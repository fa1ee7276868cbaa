"""Measurement hooks into the trainer's run (the benchmark drivers' way in; all no-ops by default).

A callback reads the :class:`~sparsecomm.app.train_state.TrainState` (model, sync and its
``stats()``, optimizers, mask, step) and the values the trainer hands it; it changes nothing in
the run. Callbacks run on every rank (a callback that writes decides itself whether rank 0
alone does). The trainer sends nothing for them: a callback that all-reduces or synchronises a
device pays for that itself, inside the run's timing.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


class Callback:
    """Override the points you need. ``wants_step_times``: when any callback sets it, the step
    engine times each step's forward, backward (with the all-reduce) and optimizer phases
    (synchronising CUDA between them) and ``on_step_end`` gets them; otherwise ``times`` is None."""

    wants_step_times = False

    def on_train_start(self, state) -> None:
        """Before the first step (after a resume: ``state.step`` is the step it starts from)."""

    def on_step_end(self, state, step: int, loss, times: Mapping[str, float] | None) -> None:
        """After each step; ``step`` = steps done, ``loss`` this rank's loss (a detached tensor),
        ``times`` phase -> seconds of this step (forward, backward, optimizer) or None."""

    def on_eval(self, state, step: int, result: Mapping[str, float]) -> None:
        """After each evaluation (``result``: test_acc, test_loss; the same on every rank)."""

    def on_train_end(self, state, summary: Mapping[str, Any]) -> dict[str, Any] | None:
        """Before the summary is written; the fields returned are merged into it."""
        return None


class Callbacks:
    """Several callbacks called in order, as one."""

    def __init__(self, callbacks: Iterable[Callback] = ()):
        self.callbacks = list(callbacks)
        self.wants_step_times = any(c.wants_step_times for c in self.callbacks)

    def on_train_start(self, state) -> None:
        for c in self.callbacks:
            c.on_train_start(state)

    def on_step_end(self, state, step: int, loss, times: Mapping[str, float] | None) -> None:
        for c in self.callbacks:
            c.on_step_end(state, step, loss, times)

    def on_eval(self, state, step: int, result: Mapping[str, float]) -> None:
        for c in self.callbacks:
            c.on_eval(state, step, result)

    def on_train_end(self, state, summary: Mapping[str, Any]) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        for c in self.callbacks:
            extra.update(c.on_train_end(state, summary) or {})
        return extra
