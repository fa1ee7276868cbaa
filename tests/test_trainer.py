"""The trainer on 2 in-process Gloo ranks (fork + file store): schedules, masks, bytes, agreement."""
from __future__ import annotations

import pytest
from apptest import compose_app, read_events
from multirank import run_ranks

from sparsecomm.app import trainer

TINY = ["task=synthetic", "task.in_features=64", "task.hidden=64", "task.depth=2", "task.num_train=256",
        "task.num_test=64", "batch_size=8", "eval_every=0", "logging.progress=false", "save_model=false",
        "cluster.num_threads=1"]


def compose_cfg(*overrides):
    return compose_app(*TINY, *overrides)


def _fit(rank, world, cfg, run_dir):
    import torch

    device = torch.device("cpu")
    t = trainer.Trainer(cfg, run_dir, device)
    summary = t.fit()
    opt = t.state.sparse_opt
    return {"summary": summary, "digest": t.mask.digest() if t.mask is not None else None,
            "opt_follows_mask": opt is None or opt.mask is t.mask, "rounds": t.kind.rounds}


def run(tmp_path, *overrides):
    cfg = compose_cfg(*overrides)
    return run_ranks(_fit, 2, cfg, str(tmp_path), timeout=120)


def mask_events(tmp_path):
    return [r for r in read_events(tmp_path) if r["event"] == "mask"]


def test_refresh_recomputes_the_mask_and_ranks_agree(tmp_path):
    r0, r1 = run(tmp_path, "schedule=refresh", "schedule.dense_steps=2", "schedule.refresh_every=3", "steps=8",
                 "mask.num_samples=32", "mask.density=0.1")
    assert r0["digest"] == r1["digest"] and r0["rounds"] == r1["rounds"] == 2
    assert r0["opt_follows_mask"] and r1["opt_follows_mask"]  # reset_mask, not a new optimizer
    s = r0["summary"]
    n, k = s["numel"], s["k"]
    assert [e["step"] for e in mask_events(tmp_path)] == [2, 5]
    assert s["bytes_sent"] == 2 * n * 4 + 6 * k * 4 and s["dense_bytes"] == 8 * n * 4
    # Each Fisher mask ranks the entries not kept whole (the head: the synthetic MLP's last Linear,
    # 64 -> 10, 10 x 64 weights + 10 biases) by the candidate exchange (sparsecomm.topk.sum_topk):
    # on 2 ranks each rank sends its m = 2 (k - head) int32 candidate positions, then its half of
    # a ring all-reduce of the float64 sums at the union of both ranks' candidates (u entries,
    # m <= u <= 2m) plus one bound: 4 m + 8 (u + 1) bytes, far below the full exchange's 8 (n - head).
    head = 10 * 64 + 10
    m = 2 * (k - head)
    sums = s["mask_score_bytes"] - 2 * 4 * m  # two masks
    assert sums % 8 == 0 and 2 * 8 * (m + 1) <= sums <= 2 * 8 * (2 * m + 1), (s["mask_score_bytes"], m)
    assert s["mask_score_bytes"] < 2 * 8 * (n - head)
    untimed = lambda d: {key: v for key, v in d.items() if not key.endswith("_s")}  # noqa: E731
    assert untimed(s) == untimed(r1["summary"])  # every rank reports the same run


def test_random_mask_with_core_full_steps(tmp_path):
    r0, r1 = run(tmp_path, "mask=random", "schedule=fish_fixed", "schedule.core_full=1:1", "steps=4",
                 "mask.density=0.1")
    s = r0["summary"]
    assert r0["digest"] == r1["digest"] and s["mask_score_bytes"] == 0
    # steps 0, 2 masked (k entries); 1, 3 full (all n entries)
    assert s["bytes_sent"] == 2 * s["k"] * 4 + 2 * s["numel"] * 4


def test_dense_is_plain_ddp(tmp_path):
    r0, _ = run(tmp_path, "mask=dense", "steps=3")
    s = r0["summary"]
    assert s["k"] is None and s["mask_digest"] is None and s["density"] == 1.0
    assert s["bytes_sent"] == s["dense_bytes"] == 3 * s["numel"] * 4
    assert mask_events(tmp_path) == []


def test_density_too_small_for_the_head_names_mask_density(tmp_path):
    with pytest.raises(AssertionError, match=r"mask\.density=0\.0005"):
        run(tmp_path, "mask.density=0.0005", "schedule=fish_fixed", "steps=2")


def _fit_buffers(rank, world, cfg, run_dir):
    import torch

    t = trainer.Trainer(cfg, run_dir, torch.device("cpu"))
    t.fit()
    return {"buffers": {n: b.clone() for n, b in t.model.named_buffers() if b.dtype.is_floating_point}}


def test_every_rank_evaluates_the_saved_model(tmp_path):
    """Each rank evaluates its test slice with rank 0's BatchNorm statistics, i.e. those of
    model.safetensors (DDP broadcasts them before each training forward, not after the last)."""
    from safetensors.torch import load_file

    cfg = compose_app("task=digits", "mask=random", "schedule=fish_fixed", "mask.density=0.05", "steps=6",
                      "batch_size=16", "eval_every=0", "logging.progress=false", "cluster.num_threads=1")
    r0, r1 = run_ranks(_fit_buffers, 2, cfg, str(tmp_path), timeout=120)
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert r0["buffers"] and r0["buffers"].keys() == r1["buffers"].keys()
    import torch

    for name, b in r0["buffers"].items():
        assert torch.equal(b, r1["buffers"][name]) and torch.equal(b, saved[name]), name


def _rng_after_evaluating(rank, world, cfg, run_dir):
    import torch

    t = trainer.Trainer(cfg, run_dir, torch.device("cpu"))
    before = torch.get_rng_state()
    t.evaluate(0)
    return torch.equal(before, torch.get_rng_state())


def test_evaluating_leaves_the_training_random_stream_alone(tmp_path):
    """An evaluation must not move torch's global random stream: the dropout of the steps after it
    (a pretrained encoder's) would differ, and a run's result would depend on ``eval_every``."""
    cfg = compose_cfg("steps=2", "schedule=fish_fixed", "mask=random", "mask.density=0.5")
    assert run_ranks(_rng_after_evaluating, 2, cfg, str(tmp_path), timeout=120) == [True, True]
