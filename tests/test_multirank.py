"""The harness itself (tests/multirank.py): a rank that dies or hangs fails the call, and says so."""
from __future__ import annotations

import os
import time

import pytest
import torch.distributed as dist

from multirank import run_ranks


def one_rank_dies(rank, world):
    dist.barrier()  # both ranks are connected: rank 0's own set-up cannot fail first
    if rank == 1:
        os._exit(3)  # no result, no traceback: as a rank killed by a signal or an abort
    time.sleep(60)


def one_rank_sleeps_forever(rank, world):
    if rank == 1:
        time.sleep(600)
    return rank


def test_a_rank_that_dies_without_a_result_fails_the_call_at_once():
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match=r"rank\(s\) \[1\] exited \(codes \[3\]\) without a result"):
        run_ranks(one_rank_dies, 2, timeout=60)
    assert time.monotonic() - t0 < 30  # not the 60 s timeout


@pytest.mark.slow  # waits for its 6 s timeout
def test_a_hung_rank_fails_the_call_with_its_threads_stacks():
    with pytest.raises(AssertionError) as failed:
        run_ranks(one_rank_sleeps_forever, 2, timeout=6)
    text = str(failed.value)
    assert "ranks timed out after 6s; finished: [0]" in text
    assert "--- rank 1's threads:" in text and "in one_rank_sleeps_forever" in text
