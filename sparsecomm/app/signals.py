"""Stopping on a signal: SIGINT, SIGTERM, SIGHUP and SIGQUIT end the run at a step boundary.

:class:`StopOnSignal` records the request; the trainer's monitor agrees on it across ranks inside
the loss all-reduce of each log step (no extra collective: nothing of this module crosses the
network); the trainer then writes a checkpoint if checkpoints are on and raises the
:class:`Interrupted` that :func:`interrupted` builds, whose ``str`` is the user's line and whose
``exit_code`` (128 + the signal's number) the app exits with.
"""
from __future__ import annotations

import signal
import threading
from typing import Any


class Interrupted(Exception):
    """The run stopped at a step boundary on a signal (:class:`StopOnSignal`); ``str`` is the line for the user.

    Raised on every rank at the same step (``collective``). ``exit_code`` is 128 + the signal's
    number, as a shell reports a process ended by that signal.
    """

    collective = True

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = int(signum)
        self.exit_code = 128 + int(signum)


class StopOnSignal:
    """SIGINT, SIGTERM, SIGHUP and SIGQUIT ask the run to stop at the next step boundary instead of killing it.

    Slurm sends SIGTERM before it kills a job at its time limit (and on ``scancel``); a closed
    terminal sends SIGHUP; torchrun and the app's own launcher pass all four on to every worker
    (torch elastic's ``signals_to_handle``). The handler only records the first signal (the
    terminal and the launcher both deliver a Ctrl-C: one request). The trainer asks
    :attr:`requested` at each step; ranks agree on it inside the loss all-reduce of each log step
    (``logging.log_every``), so every rank stops at the same step. ``install=False``: no handler
    (a trainer built inside another program, a thread other than the main one).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)

    def __init__(self, install: bool = True):
        self.signum = 0
        self._previous: dict[int, Any] = {}
        if install and threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if not self.signum:
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum != 0

    def restore(self) -> None:
        """Put back the handlers that were installed before this one."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def interrupted(signum: int | None, done: int, total: int, checkpoint: str | None, checkpoints_on: bool) -> Interrupted:
    """The :class:`Interrupted` of a run stopped after step ``done`` of ``total``.

    ``signum`` None: this rank got no signal and stops with its peers (reported as SIGTERM, what a
    launcher sends them). ``checkpoint``: the path written at this step (rank 0; None elsewhere).
    """
    signum = signum or int(signal.SIGTERM)
    if not checkpoints_on:
        kept = "no checkpoint (checkpoint.every=0)"
    else:
        kept = f"checkpoint {checkpoint} written" if checkpoint else "checkpoint written"
    return Interrupted(f"interrupted by {signal_name(signum)} at step {done} of {total}; {kept}", signum)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
