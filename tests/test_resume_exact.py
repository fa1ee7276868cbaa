"""A resume continues the same run: the mask and the final weights equal the uninterrupted run's.

The model is the digits CNN (BatchNorm: each rank's running statistics drift apart between DDP's
per-forward broadcasts, and the Fisher pass reads them in eval mode). One uninterrupted 2-rank
Gloo run checkpoints after every step; a fresh trainer pair then resumes from the checkpoints
just before, at and just after each step where a mask is chosen or refreshed, and every rank's
mask digest, weights AND buffers must equal the uninterrupted run's bit for bit (2 ranks: Gloo's
sum of two addends does not depend on their order, so no tolerance is needed). The reference is
the uninterrupted run itself: a run that never loads a checkpoint.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from apptest import compose_app
from multirank import run_ranks
from torch.utils.data import Dataset

from sparsecomm.app import trainer
from sparsecomm.app.data import ShardedData
from sparsecomm.checkpoint import decode, encode

pytestmark = pytest.mark.slow  # 2-rank runs resumed 2-4 times each: 30-70 s per test

# The smallest real config: digits CNN (BatchNorm), 2 dense steps, a Fisher mask on 2 x 24 examples.
DIGITS = ["task=digits", "batch_size=16", "eval_every=0", "eval_batch_size=128", "logging.progress=false",
          "save_model=false", "save_diff=false", "cluster.num_threads=1", "checkpoint.every=1", "checkpoint.keep=100"]
FISHER = ["mask=fisher", "mask.density=0.02", "mask.num_samples=48", "mask.batch_size=8"]
REFRESH = ["schedule=refresh", "schedule.dense_steps=2", "schedule.refresh_every=3"]
CORE_FULL = ["schedule=core_full", "schedule.dense_steps=2", "schedule.core_full=0.5"]  # full steps 3, 5 and 6
CASES = {  # name: (overrides, steps, the steps to resume at)
    # mask before step 3: resume one step before it, at it (chosen right after the resume), after it
    "fisher_warmup": ([*FISHER, "schedule=dense_warmup", "schedule.dense_steps=3"], 6, [2, 3, 4]),
    # mask before 2, refreshed before 5: before/at/after the refresh (its Fisher data order is the 2nd)
    "fisher_refresh": ([*FISHER, *REFRESH], 8, [4, 5, 6]),
    # random masks: a new seed per refresh (the kind's round count)
    "random_refresh": (["mask=random", "mask.density=0.02", *REFRESH], 8, [2, 5, 6]),
    # core/full with a probability: which steps are full is drawn per step
    "fisher_core_full": ([*FISHER, *CORE_FULL], 8, [2, 3, 5]),
    # diff pruning: L0 phase (the model swapped for its wrapper) on steps 2..4, the mask projected before 5
    "diff_pruning": (["mask=diff_pruning", "mask.density=0.02", "schedule=dense_warmup", "schedule.dense_steps=2",
                      "mask.l0_steps=3"], 7, [2, 3, 5, 6]),
    # the width core (its nested core's forward) with core/full steps
    "width_core": (["mask=width_core", *CORE_FULL], 7, [2, 4]),
    # without DDP's buffer broadcast every rank's BatchNorm statistics are its own for the whole run
    "unsynced_buffers": ([*FISHER, "schedule=dense_warmup", "schedule.dense_steps=3", "comm.sync_buffers=false"],
                         6, [3, 5]),
}

def _train(rank, world, cfg, run_dir):
    t = trainer.Trainer(cfg, run_dir, torch.device("cpu"))
    try:
        summary = t.fit()
    finally:
        t.close()
    return {"state": {k: v.clone() for k, v in t.model.state_dict().items()}, "digest": summary["mask_digest"],
            "resumed_from": summary["resumed_from"]}


def _uninterrupted(tmp_path, overrides, steps):
    run_dir = str(tmp_path / "full")
    cfg = compose_app(*DIGITS, *overrides, f"steps={steps}")
    return run_ranks(_train, 2, cfg, run_dir, timeout=300), os.path.join(run_dir, "checkpoints")


def _assert_same_run(full, resumed):
    for rank, (a, b) in enumerate(zip(full, resumed)):
        assert b["digest"] == a["digest"], f"rank {rank}: another mask"
        assert a["state"].keys() == b["state"].keys()
        for name in a["state"]:
            assert torch.equal(a["state"][name], b["state"][name]), f"rank {rank}: {name} differs"


def _differs_between_ranks(states) -> list[str]:
    return [n for n in states[0] if not torch.equal(states[0][n], states[1][n])]


@pytest.mark.parametrize("case", list(CASES))
def test_resume_anywhere_near_a_mask_step_continues_the_same_run(tmp_path, case):
    overrides, steps, resume_at = CASES[case]
    full, ckpts = _uninterrupted(tmp_path, overrides, steps)
    if "comm.sync_buffers=false" in overrides:  # the case is real: the ranks' statistics differ at the end
        assert any("running_" in n for n in _differs_between_ranks([r["state"] for r in full]))
    for at in resume_at:
        cfg = compose_app(*DIGITS, *overrides, f"steps={steps}",
                          f"checkpoint.resume={os.path.join(ckpts, f'step-{at:08d}.ckpt')}")
        resumed = run_ranks(_train, 2, cfg, str(tmp_path / f"from{at}"), timeout=300)
        assert resumed[0]["resumed_from"].endswith(f"step-{at:08d}.ckpt")
        _assert_same_run(full, resumed)


def test_what_a_resume_cannot_carry_over_is_said(tmp_path):
    """A checkpoint without the per-rank buffers (the format before them) and one of another
    world size both resume, each with one log line saying what is not carried over."""
    overrides, steps = [*FISHER, "schedule=dense_warmup", "schedule.dense_steps=3"], 4
    full, ckpts = _uninterrupted(tmp_path, overrides, steps)
    at = os.path.join(ckpts, "step-00000003.ckpt")  # the mask is chosen right after it
    with open(at, "rb") as f:
        sd = decode(f.read())
    assert sd["state"]["buffers"]["ranks"][1], "rank 1's BatchNorm statistics differ from rank 0's here"
    del sd["state"]["buffers"]
    older = str(tmp_path / "older.ckpt")
    with open(older, "wb") as f:
        f.write(encode(sd))
    cfg = compose_app(*DIGITS, *overrides, f"steps={steps}", f"checkpoint.resume={older}")
    resumed = run_ranks(_train, 2, cfg, str(tmp_path / "older"), timeout=300)
    assert resumed[0]["digest"] != full[0]["digest"]  # rank 1 scored with rank 0's statistics: another mask
    log = (tmp_path / "older" / "log.txt").read_text()
    assert "the checkpoint holds rank 0's module buffers (BatchNorm statistics) only" in log

    cfg = compose_app(*DIGITS, *overrides, f"steps={steps}", f"checkpoint.resume={at}")
    three = run_ranks(_train, 3, cfg, str(tmp_path / "three"), timeout=300)
    assert three[0]["resumed_from"] == at and three[0]["digest"] == three[2]["digest"]
    log = (tmp_path / "three" / "log.txt").read_text()
    assert "resuming a 2-rank checkpoint on 3 ranks" in log and "every rank starts from rank 0's module buffers" in log


class _Noisy(Dataset):
    """Each item draws from the torch RNG of the process that loads it (random augmentation)."""

    def __len__(self):
        return 64

    def __getitem__(self, i):
        return torch.rand(()), i


def test_a_resumed_stream_has_the_workers_of_the_uninterrupted_one():
    """``num_workers=1``: a stream resumed mid-epoch, in a process whose own RNG is elsewhere,
    yields the items (and the workers' draws) of the uninterrupted stream, across an epoch end."""
    task = SimpleNamespace(train_set=_Noisy(), test_set=_Noisy(), collate_fn=None)

    def stream():
        return ShardedData(task, 1, 2, batch_size=4, eval_batch_size=4, seed=3, device=torch.device("cpu"),
                           num_workers=1)

    torch.manual_seed(0)
    whole = stream()
    batches = [whole.next_batch() for _ in range(12)]  # 8 batches an epoch: 5 in epoch 0, then 7 more
    torch.manual_seed(1)
    resumed = stream()
    resumed.load_state_dict({"epoch": 0, "batch": 5})
    for (x, i), (rx, ri) in zip(batches[5:], [resumed.next_batch() for _ in range(7)]):
        assert torch.equal(i, ri) and torch.equal(x, rx)
    assert len({float(v) for x, _ in batches for v in x}) == 48  # real draws, not a constant
