"""Stopping on a signal (sparsecomm/app/signals.py): the handler, the user's line, and the ranks' agreement.

The end-to-end runs (a real SIGINT/SIGTERM/SIGHUP to the app and under torchrun, the exit code,
the resume command) are in tests/test_exit.py; here the pieces, and 2 forked ranks of which one
gets the signal.
"""
from __future__ import annotations

import os
import signal

import pytest
from multirank import run_ranks
from trainrun import compose_cfg, records, train

from sparsecomm.app.signals import StopOnSignal, interrupted


def test_the_first_signal_is_recorded_and_the_handlers_put_back():
    before = {sig: signal.getsignal(sig) for sig in StopOnSignal.SIGNALS}
    stop = StopOnSignal()
    try:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGINT)  # a second request (the terminal and the launcher): the first one counts
        assert stop.requested and stop.signum == signal.SIGHUP
    finally:
        stop.restore()
    assert {sig: signal.getsignal(sig) for sig in StopOnSignal.SIGNALS} == before
    untouched = StopOnSignal(install=False)
    assert {sig: signal.getsignal(sig) for sig in StopOnSignal.SIGNALS} == before and not untouched.requested


@pytest.mark.parametrize("signum,path,on,line,code", ids=["rank0", "other-rank", "no-checkpoints"], argvalues=[
    (signal.SIGINT, "/r/step-00000030.ckpt", True,
     "interrupted by SIGINT at step 30 of 2000; checkpoint /r/step-00000030.ckpt written", 130),
    (None, None, True, "interrupted by SIGTERM at step 30 of 2000; checkpoint written", 143),  # a rank > 0
    (signal.SIGHUP, None, False, "interrupted by SIGHUP at step 30 of 2000; no checkpoint (checkpoint.every=0)", 129),
])
def test_the_line_and_the_exit_code(signum, path, on, line, code):
    e = interrupted(signum, 30, 2000, path, on)
    assert str(e) == line and e.exit_code == code


@pytest.mark.parametrize("every", [3, 4])
def test_a_signal_on_one_rank_stops_both_at_one_step_with_one_checkpoint(tmp_path, every):
    """Rank 1 alone gets SIGTERM before step 1: both stop after the next log step (3), which is a
    checkpoint step (every=3: written once, not again for the stop) or not (every=4: written for it)."""
    cfg = compose_cfg("mask=random", "mask.density=0.2", "schedule=fish_fixed", "steps=12", f"checkpoint.every={every}")
    r0, r1 = run_ranks(train, 2, cfg, str(tmp_path), None, None, {1: 1}, timeout=120)
    ck = tmp_path / "checkpoints" / "step-00000003.ckpt"
    assert r0["stopped"] == f"interrupted by SIGTERM at step 3 of 12; checkpoint {ck} written"
    assert r1["stopped"] == "interrupted by SIGTERM at step 3 of 12; checkpoint written"
    assert r0["exit_code"] == r1["exit_code"] == 128 + signal.SIGTERM and r0["step"] == r1["step"] == 3
    assert os.listdir(ck.parent) == [ck.name]
    events = [(r["event"], r["step"]) for r in records(str(tmp_path)) if r["event"] in ("checkpoint", "interrupted")]
    assert events == [("checkpoint", 3), ("interrupted", 3)]
