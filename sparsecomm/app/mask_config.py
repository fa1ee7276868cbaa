"""Checks of ``mask/`` fields for diff pruning and width cores, and the step plan they imply."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from sparsecomm.diff_pruning import _check_gate_args
from sparsecomm.width_core import check_fraction

from .fields import whole_number
from .schedule import Schedule, ScheduleError


class PhaseConfigError(ValueError):
    """A mask/ setting of diff pruning or width cores is invalid; the message names the field."""


def _number(cfg: Mapping, key: str, *, positive: bool = False, nonneg: bool = False) -> float:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PhaseConfigError(f"mask.{key}={value!r} is not a number")
    if positive and not value > 0:
        raise PhaseConfigError(f"mask.{key}={value!r} must be > 0")
    if nonneg and value < 0:
        raise PhaseConfigError(f"mask.{key}={value!r} must be >= 0")
    return float(value)


def check_mask_config(mask: Mapping, steps: int, schedule: Mapping) -> None:
    """Check the fields of ``mask=diff_pruning`` / ``mask=width_core`` (others: nothing to do)."""
    if mask.get("name") == "width_core":
        try:
            check_fraction(mask.get("fraction"), field="mask.fraction")
        except ValueError as e:
            raise PhaseConfigError(str(e)) from None
        if mask.get("alone_lr") is not None:
            _number(mask, "alone_lr", positive=True)
        for key in ("nested", "compare_alone"):
            if not isinstance(mask.get(key, False), bool):
                raise PhaseConfigError(f"mask.{key}={mask.get(key)!r} must be true or false")
        return
    if mask.get("name") != "diff_pruning":
        return
    l0 = mask.get("l0_steps")
    if isinstance(l0, bool) or not isinstance(l0, int) or l0 < 1:
        raise PhaseConfigError(f"mask.l0_steps={l0!r} must be a whole number >= 1 (steps of the L0 phase)")
    dense = whole_number(schedule.get("dense_steps", 0), "schedule.dense_steps", error=ScheduleError)
    if dense + l0 >= int(steps):
        raise PhaseConfigError(
            f"mask.l0_steps={l0} leaves no fixed-mask step: schedule.dense_steps={dense} + mask.l0_steps={l0} "
            f"must be < steps={steps}; lower mask.l0_steps or raise steps")
    if whole_number(schedule.get("refresh_every", 0), "schedule.refresh_every", error=ScheduleError):
        raise PhaseConfigError(
            f"schedule.refresh_every={schedule.get('refresh_every')} with mask=diff_pruning: the diff-pruning mask "
            f"is projected once, after the L0 phase; use schedule.refresh_every=0 (e.g. schedule=fish_fixed)")
    _number(mask, "l0_penalty", nonneg=True)
    _number(mask, "alpha_lr", positive=True)
    _number(mask, "log_alpha_init")
    temperature = _number(mask, "temperature", positive=True)
    stretch = mask.get("stretch")
    try:
        l, r = (float(v) for v in stretch)
        _check_gate_args(l, r, temperature)
    except (TypeError, ValueError):
        raise PhaseConfigError(f"mask.stretch={list(stretch) if stretch is not None else None!r} must be [l, r] "
                               f"with l < 0 and r > 1, e.g. mask.stretch=[-1.5,1.5]") from None
    for key in ("structured", "ungated_head"):
        if not isinstance(mask.get(key), bool):
            raise PhaseConfigError(f"mask.{key}={mask.get(key)!r} must be true or false")


def build_schedule(cfg: Mapping) -> Schedule:
    """The run's step plan from ``cfg.schedule``; with ``mask=diff_pruning`` the L0 phase
    (``mask.l0_steps`` steps after the ``schedule.dense_steps`` warm-up) is part of the dense phase,
    so the mask is projected before step ``dense_steps + l0_steps`` and core/full cycles count from
    there."""
    mask = cfg.mask
    schedule = Schedule.from_config(cfg.schedule, cfg.steps, cfg.get("seed", 0), masked=mask.get("name") != "dense")
    if mask.get("name") == "diff_pruning":
        check_mask_config(mask, schedule.steps, cfg.schedule)
        schedule = dataclasses.replace(schedule, dense_steps=schedule.dense_steps + int(mask.l0_steps))
    return schedule
