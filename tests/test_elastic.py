"""Elastic restart, for real: the app under ``torchrun --max-restarts``, rank 1 SIGKILLed mid-run.

torchrun restarts both workers, they resume from the last checkpoint, and the run ends with
exactly the parameters of an uninterrupted run (2 Gloo ranks, digits, CPU).
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from apptest import read_events, torchrun_app, worker_pid

pytestmark = pytest.mark.slow  # a torchrun job killed and restarted: about 90 s

ARGS = ["steps=240", "batch_size=16", "eval_every=0", "logging.progress=false", "logging.log_every=10",
        "mask.num_samples=64", "schedule.dense_steps=20", "cluster.num_threads=1", "cluster.nproc_per_node=2",
        "checkpoint.every=40"]


def load_params(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_sigkill_one_rank_restarts_and_matches_the_uninterrupted_run(tmp_path):
    run_id = f"cut{os.getpid()}"
    full = torchrun_app(tmp_path, "full", ARGS)  # the reference, at the same time (start-up dominates)
    cut = torchrun_app(tmp_path, run_id, ARGS, max_restarts=2)
    run_dir = tmp_path / run_id
    killed = None
    deadline = time.time() + 120
    try:
        while killed is None and time.time() < deadline and cut.poll() is None:
            evs = read_events(run_dir, live=True)
            ckpts = [e["step"] for e in evs if e["event"] == "checkpoint"]
            trained = [e["step"] for e in evs if e["event"] == "train"]
            if ckpts and trained and trained[-1] > ckpts[-1] and trained[-1] < 200:
                pid = worker_pid(run_id, 1)
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    killed = (pid, ckpts[-1], trained[-1])
            time.sleep(0.02)
        _, err = cut.communicate(timeout=200)
        _, full_err = full.communicate(timeout=200)
    finally:
        for proc in (cut, full):
            if proc.poll() is None:
                proc.kill()
    assert full.returncode == 0, full_err[-4000:]
    assert killed is not None, f"the run ended before a kill was possible:\n{err[-3000:]}"
    assert cut.returncode == 0, err[-4000:]

    evs = read_events(run_dir)
    resumes = [e for e in evs if e["event"] == "resume"]
    assert len(resumes) == 1 and resumes[0]["step"] >= killed[1] and not resumes[0]["resharded"], resumes
    summary = json.loads((run_dir / "summary.json").read_text())
    full_summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["resumed_from"] and full_summary["resumed_from"] is None
    for key in ("bytes_sent", "dense_bytes", "test_acc", "test_loss", "mask_digest"):
        assert summary[key] == full_summary[key], key

    a, b = load_params(tmp_path / "full" / "model.safetensors"), load_params(run_dir / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
