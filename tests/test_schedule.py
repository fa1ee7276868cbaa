"""sparsecomm.app.schedule: the step plan (dense warm-up, mask refresh, core/full) and the LR factor."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from sparsecomm.app.schedule import CoreFull, LRSchedule, Schedule, ScheduleError


def sched(steps=10, **fields) -> Schedule:
    return Schedule.from_config(OmegaConf.create({"name": "t", **fields}), steps)


def test_fish_fixed_masks_once_before_the_first_step():
    s = sched(10)
    assert s.mask_steps() == [0]
    assert not any(s.sends_dense(i) for i in range(10))


def test_dense_warmup_then_mask():
    s = sched(10, dense_steps=3)
    assert s.mask_steps() == [3]
    assert [s.sends_dense(i) for i in range(5)] == [True, True, True, False, False]
    assert [s.is_dense_phase(i) for i in range(5)] == [True, True, True, False, False]


def test_refresh_every_m_steps_after_the_first_mask():
    assert sched(20, dense_steps=2, refresh_every=5).mask_steps() == [2, 7, 12, 17]


def test_core_full_pattern_counts_from_the_first_sparse_step():
    s = sched(12, dense_steps=2, core_full="3:1")
    assert [i for i in range(12) if s.is_full_step(i)] == [5, 9]  # sparse steps 3, 7
    assert [s.sends_dense(i) for i in range(6)] == [True, True, False, False, False, True]


def test_core_full_probability_is_the_same_on_every_rank():
    """Every rank (any process, any run) draws the same decisions: a pure function of (seed, step).
    The full steps among the first 40, written down once from the documented rule (step s is
    full when random.Random(seed * 1_000_003 + s).random() < p; seed 3, p 0.25)."""
    a, b = CoreFull.parse(0.25, seed=3), CoreFull.parse("0.25", seed=3)
    assert [i for i in range(40) if a.is_full(i)] == [0, 7, 10, 12, 15, 21, 26, 27, 31, 38]
    draws = [b.is_full(i) for i in range(2000)]
    assert 0.2 < sum(draws) / len(draws) < 0.3
    assert [i for i in range(40) if CoreFull.parse(0.25, seed=4).is_full(i)] != [0, 7, 10, 12, 15, 21, 26, 27, 31, 38]
    assert CoreFull.parse(None) is None


@pytest.mark.parametrize("spec", ["3-1", "a:b", "0:0", "1:2:3", 1.5, -0.1, "often"])
def test_bad_core_full_names_the_field(spec):
    with pytest.raises(ScheduleError, match=r"schedule\.core_full"):
        CoreFull.parse(spec)


@pytest.mark.parametrize("fields,steps,field", [
    ({"dense_steps": 10}, 10, "schedule.dense_steps"),
    ({"dense_steps": -1}, 10, "schedule.dense_steps"),
    ({"refresh_every": 1.5}, 10, "schedule.refresh_every"),
    ({}, 0, "steps"),
])
def test_bad_schedule_names_the_field(fields, steps, field):
    with pytest.raises(ScheduleError, match=field.replace(".", r"\.")):
        sched(steps, **fields)


def test_lr_constant_with_linear_warmup():
    lr = LRSchedule(name="constant", total_steps=10, warmup_steps=4)
    assert [lr.factor(i) for i in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_lr_cosine_and_linear_reach_min_ratio_at_the_last_step():
    cos = LRSchedule(name="cosine", total_steps=11, min_ratio=0.1)
    lin = LRSchedule(name="linear", total_steps=11, min_ratio=0.0)
    assert cos.factor(0) == pytest.approx(1.0) and cos.factor(10) == pytest.approx(0.1)
    assert cos.factor(5) == pytest.approx(0.55)
    assert lin.factor(5) == pytest.approx(0.5) and lin.factor(10) == pytest.approx(0.0)
    assert all(cos.factor(i) >= cos.factor(i + 1) for i in range(10))


def test_lr_config_errors():
    with pytest.raises(ScheduleError, match=r"schedule\.lr\.name"):
        LRSchedule.from_config(OmegaConf.create({"name": "step"}), 10)
    with pytest.raises(ScheduleError, match=r"schedule\.lr\.min_ratio"):
        LRSchedule.from_config(OmegaConf.create({"name": "cosine", "min_ratio": 2}), 10)
