"""Steps whose all-reduced gradient holds NaN/Inf (sparsecomm/app/nonfinite.py): skipped on every rank, counted, bounded."""
from __future__ import annotations

import pytest
import torch
from multirank import run_ranks
from trainrun import assert_same_params, compose_cfg, records, train

from sparsecomm.app import config
from sparsecomm.app.nonfinite import NonFiniteGradients, NonFiniteGuard


def test_the_guard_counts_streaks_and_stops_at_the_limit():
    guard = NonFiniteGuard(max_in_a_row=3)
    verdicts = [guard.check(bad, step) for step, bad in enumerate([True, True, False, True, False])]
    assert verdicts == [True, True, False, True, False]
    assert (guard.skipped, guard.in_a_row) == (3, 0)
    restored = NonFiniteGuard(max_in_a_row=3)
    guard.check(True, 5), guard.check(True, 6)
    restored.load_state_dict(guard.state_dict())  # a resume carries the streak over
    assert (restored.skipped, restored.in_a_row) == (5, 2)
    with pytest.raises(NonFiniteGradients, match=r"^step 7: .* for 3 steps in a row \(nonfinite.max_in_a_row=3, 6 skipped"):
        restored.check(True, 7)


@pytest.mark.parametrize("mask", ["random", "dense"])
def test_nonfinite_step_is_skipped_on_every_rank(tmp_path, mask):
    cfg = compose_cfg(f"mask={mask}", *(["mask.density=0.2"] if mask == "random" else []), "schedule=fish_fixed",
                      "steps=6")
    r0, r1 = run_ranks(train, 2, cfg, str(tmp_path), None, {1: {3}}, timeout=120)
    assert r0["summary"]["skipped_steps"] == r1["summary"]["skipped_steps"] == 1
    assert_same_params(r0["params"], r1["params"])  # both ranks skipped the same step
    assert all(torch.isfinite(v).all() for v in r0["params"].values() if v.is_floating_point())
    assert [r["step"] for r in records(str(tmp_path)) if r["event"] == "nonfinite"] == [4]


def test_nonfinite_in_a_row_stops_the_run(tmp_path):
    cfg = compose_cfg("mask=random", "mask.density=0.2", "schedule=fish_fixed", "steps=8", "nonfinite.max_in_a_row=2")
    r0, r1 = run_ranks(train, 2, cfg, str(tmp_path), None, {0: {2, 3}}, timeout=120)
    for r in (r0, r1):
        assert r["error"].startswith("NonFiniteGradients: step 3:") and "nonfinite.max_in_a_row=2" in r["error"]


def test_a_limit_below_one_names_the_field():
    with pytest.raises(ValueError, match=r"nonfinite\.max_in_a_row"):
        config.check_config(compose_cfg("nonfinite.max_in_a_row=0"))
