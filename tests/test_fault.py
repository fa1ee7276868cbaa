"""Fault tolerance of the trainer (issue 6): bit-exact resume, resharding, non-finite steps, bad checkpoints.

Ranks are forked Gloo processes (tests/multirank.py); a "crash" is an exception raised on every
rank before step ``crash_at`` (a new process group then resumes), the real SIGKILL under torchrun
is in tests/test_elastic.py.
"""
from __future__ import annotations

import os

import pytest
import torch
from apptest import Crash, compose_app, crash_before, read_events
from multirank import run_ranks

from sparsecomm.app import config, trainer

TINY = ["task=synthetic", "task.in_features=32", "task.hidden=32", "task.depth=2", "task.num_train=256",
        "task.num_test=64", "batch_size=8", "eval_every=4", "logging.progress=false", "logging.log_every=3",
        "save_model=false", "cluster.num_threads=1"]
REFRESH = ["mask.num_samples=32", "mask.density=0.2", "schedule=refresh", "schedule.dense_steps=2", "schedule.refresh_every=5", "steps=14",
           "checkpoint.every=4"]
UNTIMED = ("time", "steps_per_s", "seconds", "path")


def compose_cfg(*overrides):
    return compose_app(*TINY, *overrides)


def _run(rank, world, cfg, run_dir, crash_at=None, poison=None):
    """Train; ``crash_at``: raise before that step on every rank; ``poison``: {rank: steps} NaN inputs."""
    try:
        t = trainer.Trainer(cfg, run_dir, torch.device("cpu"))
    except ValueError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    if crash_at is not None:
        crash_before(t, crash_at)
    if poison and rank in poison:
        real_batch = t.data.next_batch

        def next_batch():
            inputs, targets = real_batch()
            return (inputs * float("nan") if t.step in poison[rank] else inputs), targets
        t.data.next_batch = next_batch
    try:
        summary = t.fit()
    except Crash:
        return {"crashed": True}
    except (ValueError, RuntimeError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        t.close()
    return {"summary": summary, "params": {k: v.clone() for k, v in t.model.state_dict().items()},
            "digest": t.mask.digest() if t.mask is not None else None}


def records(run_dir):
    return read_events(run_dir)


def untimed(r):
    return {k: v for k, v in r.items() if k not in UNTIMED}


def assert_same_params(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path):
    cfg = compose_cfg(*REFRESH)
    full_dir, cut_dir = str(tmp_path / "full"), str(tmp_path / "cut")
    full = run_ranks(_run, 2, cfg, full_dir, timeout=120)
    # Crash before step 11: checkpoints at 4 and 8 exist, steps 8..10 are lost and recomputed.
    assert run_ranks(_run, 2, cfg, cut_dir, 11, timeout=120) == [{"crashed": True}] * 2
    assert sorted(os.listdir(os.path.join(cut_dir, "checkpoints"))) == ["step-00000004.ckpt", "step-00000008.ckpt"]
    resumed = run_ranks(_run, 2, cfg, cut_dir, timeout=120)

    for r in range(2):
        assert_same_params(full[r]["params"], resumed[r]["params"])
        assert full[r]["digest"] == resumed[r]["digest"]
    s_full, s_res = full[0]["summary"], resumed[0]["summary"]
    assert s_res["resumed_from"].endswith("step-00000008.ckpt")
    for key in ("bytes_sent", "dense_bytes", "mask_score_bytes", "test_acc", "test_loss", "k", "mask_digest"):
        assert s_full[key] == s_res[key], key

    recs = records(cut_dir)
    (i,) = [j for j, r in enumerate(recs) if r["event"] == "resume"]
    assert recs[i]["step"] == 8 and recs[i]["resharded"] is False
    after = [untimed(r) for r in recs[i + 1:] if r["event"] not in ("summary",)]
    expected = [untimed(r) for r in records(full_dir) if r["step"] > 8 and r["event"] != "summary"]
    assert [r["event"] for r in after] == [r["event"] for r in expected]
    assert after == expected  # train loss (window across the checkpoint), eval, mask refresh at 12, bytes


def test_resume_with_another_world_size_says_so(tmp_path):
    cfg = compose_cfg(*REFRESH)
    two = str(tmp_path / "two")
    assert run_ranks(_run, 2, cfg, two, 11, timeout=120) == [{"crashed": True}] * 2
    one = str(tmp_path / "one")
    cfg1 = compose_cfg(*REFRESH, f"checkpoint.resume={two}/checkpoints")
    (res,) = run_ranks(_run, 1, cfg1, one, timeout=120)
    assert res["summary"]["world_size"] == 1 and res["summary"]["resumed_from"].endswith("step-00000008.ckpt")
    (ev,) = [r for r in records(one) if r["event"] == "resume"]
    assert ev["resharded"] is True and ev["saved_world_size"] == 2 and ev["world_size"] == 1
    assert [r["step"] for r in records(one) if r["event"] == "train"] == [9, 12, 14]


@pytest.mark.parametrize("mask", ["random", "dense"])
def test_nonfinite_step_is_skipped_on_every_rank(tmp_path, mask):
    cfg = compose_cfg(f"mask={mask}", *(["mask.density=0.2"] if mask == "random" else []), "schedule=fish_fixed",
                      "steps=6")
    r0, r1 = run_ranks(_run, 2, cfg, str(tmp_path), None, {1: {3}}, timeout=120)
    assert r0["summary"]["skipped_steps"] == r1["summary"]["skipped_steps"] == 1
    assert_same_params(r0["params"], r1["params"])  # both ranks skipped the same step
    assert all(torch.isfinite(v).all() for v in r0["params"].values() if v.is_floating_point())
    assert [r["step"] for r in records(str(tmp_path)) if r["event"] == "nonfinite"] == [4]


def test_nonfinite_in_a_row_stops_the_run(tmp_path):
    cfg = compose_cfg("mask=random", "mask.density=0.2", "schedule=fish_fixed", "steps=8", "nonfinite.max_in_a_row=2")
    r0, r1 = run_ranks(_run, 2, cfg, str(tmp_path), None, {0: {2, 3}}, timeout=120)
    for r in (r0, r1):
        assert r["error"].startswith("NonFiniteGradients: step 3:") and "nonfinite.max_in_a_row=2" in r["error"]


def _checkpointed(tmp_path, *overrides):
    cfg = compose_cfg("schedule=fish_fixed", "mask=random", "mask.density=0.2", "steps=6", "checkpoint.every=2", *overrides)
    run_dir = str(tmp_path / "run")
    run_ranks(_run, 1, cfg, run_dir, timeout=120)
    return cfg, run_dir, os.path.join(run_dir, "checkpoints")


@pytest.mark.slow
def test_corrupted_checkpoint_falls_back_loudly_then_errors(tmp_path, capfd):
    cfg, run_dir, ck = _checkpointed(tmp_path)
    assert sorted(os.listdir(ck)) == ["step-00000002.ckpt", "step-00000004.ckpt", "step-00000006.ckpt"]
    newest = os.path.join(ck, "step-00000006.ckpt")
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    (res,) = run_ranks(_run, 1, cfg, run_dir, timeout=120)
    assert res["summary"]["resumed_from"].endswith("step-00000004.ckpt")
    err = capfd.readouterr().err
    skipped = [line for line in err.splitlines() if line.startswith("sparsecomm: skipping checkpoint")]
    # one loud line naming the damaged file (not the one it fell back to), as the run printed it
    assert len(skipped) == 1, err[-3000:]
    assert skipped[0].startswith(f"sparsecomm: skipping checkpoint {newest}: ") and "falling back" in skipped[0]
    assert "step-00000004.ckpt" not in skipped[0]
    for name in os.listdir(ck):  # now damage every one
        with open(os.path.join(ck, name), "r+b") as f:
            f.seek(-5, 2)
            f.write(b"XXXXX")
    (res,) = run_ranks(_run, 1, cfg, run_dir, timeout=120)
    # The fix it suggests is safe to follow: a new run in a fresh folder (not resume=never, issue 9).
    assert res["error"].startswith("CheckpointError: no checkpoint in") and "another run_id" in res["error"]
    (res,) = run_ranks(_run, 1, compose_cfg("schedule=fish_fixed", "mask=random", "mask.density=0.2", "steps=6",
                                            f"checkpoint.resume={newest}"), str(tmp_path / "x"), timeout=120)
    assert res["error"].startswith("CheckpointError: checkpoint.resume=") and "truncated or corrupted" in res["error"]


@pytest.mark.slow
def test_checkpoint_of_another_model_or_config_is_refused(tmp_path):
    _, _, ck = _checkpointed(tmp_path)
    other = compose_cfg("schedule=fish_fixed", "mask=random", "mask.density=0.2", "steps=6", "task.hidden=16", f"checkpoint.resume={ck}")
    (res,) = run_ranks(_run, 1, other, str(tmp_path / "o"), timeout=120)
    assert "is a checkpoint of another model" in res["error"] and "another run_id" in res["error"]
    assert "\n" not in res["error"]
    lr = compose_cfg("schedule=fish_fixed", "mask=random", "mask.density=0.2", "steps=6", "optim.lr=0.5", f"checkpoint.resume={ck}")
    (res,) = run_ranks(_run, 1, lr, str(tmp_path / "l"), timeout=120)
    assert "was written with another config: optim.lr=" in res["error"]


@pytest.mark.slow
def test_mask_file_for_another_model_names_mask_path(tmp_path):
    from sparsecomm.app import models
    from sparsecomm import random_mask

    path = str(tmp_path / "mask.safetensors")
    random_mask(models.mlp(32, 16, 2, 10), density=0.2).save(path)
    cfg = compose_cfg("mask=file", f"mask.path={path}", "schedule=fish_fixed", "steps=2")
    config.check_config(cfg)  # the file exists; the model does not fit it
    (res,) = run_ranks(_run, 1, cfg, str(tmp_path / "r"), timeout=120)
    assert res["error"].startswith(f"ConfigError: mask.path='{path}': ") and "another model" in res["error"]
    # a mask for this model trains
    good = str(tmp_path / "good.safetensors")
    random_mask(models.mlp(32, 32, 2, 10), density=0.2).save(good)
    (res,) = run_ranks(_run, 1, compose_cfg("mask=file", f"mask.path={good}", "schedule=fish_fixed", "steps=2"),
                       str(tmp_path / "g"), timeout=120)
    assert res["summary"]["mask"] == "file"


@pytest.mark.parametrize("override,field", [
    ("checkpoint.every=-1", "checkpoint.every"),
    ("checkpoint.keep=0", "checkpoint.keep"),
    ("checkpoint.every=often", "checkpoint.every"),
    ("checkpoint.resume=/no/such/ckpt", "checkpoint.resume"),
    ("nonfinite.max_in_a_row=0", "nonfinite.max_in_a_row"),
    ("mask=file", "mask.path"),
    ("mask=file mask.path=/no/such.safetensors", "mask.path"),
])
def test_fault_config_errors_name_the_field(override, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        config.check_config(compose_cfg(*override.split()))


def _start(rank, world, cfgs, run_dir):
    try:
        trainer.Trainer(cfgs[rank], run_dir, torch.device("cpu")).close()
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return "started"


def test_ranks_with_different_configs_stop_listing_each_hash(tmp_path):
    cfgs = [compose_cfg("mask=random", "steps=4"), compose_cfg("mask=random", "steps=4", "optim.lr=0.5")]
    hashes = [config.config_hash(c) for c in cfgs]
    for msg in run_ranks(_start, 2, cfgs, str(tmp_path), timeout=120):
        assert msg.startswith("RankDisagreement: ranks disagree on the config hash")
        assert f"rank 0: {hashes[0]}" in msg and f"rank 1: {hashes[1]}" in msg


def test_leftover_temporary_files_of_a_killed_write_are_removed(tmp_path):
    cfg, run_dir, ck = _checkpointed(tmp_path)
    leftover = os.path.join(ck, ".tmp-abc123step-00000008.ckpt")
    with open(leftover, "wb") as f:
        f.write(b"half a checkpoint")
    (res,) = run_ranks(_run, 1, cfg, run_dir, timeout=120)
    assert res["summary"]["resumed_from"].endswith("step-00000006.ckpt") and not os.path.exists(leftover)
