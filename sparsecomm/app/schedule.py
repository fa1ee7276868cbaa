"""What each training step does, as pure functions of the step number (config group ``schedule/``).

Nothing here talks to the network or holds state that changes while training: every rank
evaluates the same functions of the same step and so takes the same decisions, and a resumed
run needs only the step number to be back in place.

* :class:`Schedule`: dense warm-up, when the mask is (re)computed, which steps all-reduce the
  full gradient. Its three configs::

      fish_fixed    dense_steps=0,  refresh_every=0    mask once before step 0, sparse to the end
      dense_warmup  dense_steps=N,  refresh_every=0    N dense steps, then mask, then sparse
      refresh       dense_steps=N,  refresh_every=M    as dense_warmup, new mask every M steps

* :class:`CoreFull`: core/full alternation of the sparse steps ("3:1": three masked steps, then
  one step that all-reduces and updates the whole model), by pattern or probability.
* :class:`LRSchedule`: the learning-rate factor (constant / cosine / linear, linear warm-up).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import partial
from typing import Any

from .fields import whole_number
from .schema import LRConfig, ScheduleConfig

LR_KINDS = ("constant", "cosine", "linear")


class ScheduleError(ValueError):
    """A schedule setting is invalid; the message names the field and the fix."""


_whole = partial(whole_number, error=ScheduleError)


@dataclass(frozen=True)
class CoreFull:
    """Which sparse steps are "full" steps: dense all-reduce and a dense update of the whole model.

    ``pattern=(core, full)``: a cycle of ``core`` masked steps followed by ``full`` full steps,
    counted from the first sparse step ("3:1" -> core, core, core, full, core, ...).
    ``probability=p``: each sparse step is full with probability p, drawn from a generator
    seeded by (seed, step) so every rank draws the same.

    Issue 5 builds the core/full training on top of this; the trainer already sends the gradient
    densely and uses the dense optimizer on the steps :meth:`is_full` names.
    """

    core: int = 1
    full: int = 0
    probability: float | None = None
    seed: int = 0

    @classmethod
    def parse(cls, spec: Any, seed: int = 0, field: str = "schedule.core_full") -> CoreFull | None:
        """``None`` -> no alternation; ``"C:F"`` -> pattern; a number in [0, 1] -> probability."""
        if spec is None:
            return None
        if isinstance(spec, str) and ":" in spec:
            parts = spec.split(":")
            try:
                core, full = (int(p) for p in parts)
            except ValueError:
                core = full = -1
            if len(parts) != 2 or core < 0 or full < 0 or core + full == 0:
                raise ScheduleError(
                    f"{field}={spec!r} is not a pattern; use 'C:F' with whole numbers, e.g. '3:1' for "
                    f"3 core steps then 1 full step, or a probability such as 0.25")
            return cls(core=core, full=full, seed=seed)
        try:
            p = float(spec)
        except (TypeError, ValueError):
            p = -1.0
        if not 0.0 <= p <= 1.0:
            raise ScheduleError(f"{field}={spec!r} is neither a pattern 'C:F' (e.g. '3:1') nor a probability in [0, 1]")
        return cls(probability=p, seed=seed)

    def is_full(self, sparse_step: int) -> bool:
        """Whether the ``sparse_step``-th sparse step (0-based) is a full step."""
        if self.probability is not None:
            return random.Random(self.seed * 1_000_003 + sparse_step).random() < self.probability
        return sparse_step % (self.core + self.full) >= self.core


@dataclass(frozen=True)
class Schedule:
    """Step plan of one run: ``steps`` steps, the first ``dense_steps`` dense, then sparse.

    The mask is computed before step ``dense_steps`` and, with ``refresh_every = M > 0``, again
    before every M-th step after that.
    """

    name: str
    steps: int
    dense_steps: int = 0
    refresh_every: int = 0
    core_full: CoreFull | None = None

    @classmethod
    def from_config(cls, cfg: Any, steps: int, seed: int = 0, masked: bool = True) -> Schedule:
        """Build from the ``schedule`` config node, checking every field (errors name it); a field
        the node lacks takes its default in :class:`sparsecomm.app.schema.ScheduleConfig`.

        ``masked=False`` (mask=dense: every step is dense anyway) skips the check that the
        dense warm-up leaves sparse steps.
        """
        steps = _whole(steps, "steps", minimum=1)
        dense_steps = _whole(cfg.get("dense_steps", ScheduleConfig.dense_steps), "schedule.dense_steps")
        refresh_every = _whole(cfg.get("refresh_every", ScheduleConfig.refresh_every), "schedule.refresh_every")
        if masked and dense_steps >= steps:
            raise ScheduleError(
                f"schedule.dense_steps={dense_steps} leaves no sparse step of steps={steps}; "
                f"lower schedule.dense_steps or use mask=dense for dense training")
        core_full = CoreFull.parse(cfg.get("core_full", ScheduleConfig.core_full), seed=seed)
        return cls(name=str(cfg.get("name", "custom")), steps=steps, dense_steps=dense_steps,
                   refresh_every=refresh_every, core_full=core_full)

    def is_dense_phase(self, step: int) -> bool:
        """Before the first mask: dense optimizer, full all-reduce."""
        return step < self.dense_steps

    def mask_due(self, step: int) -> bool:
        """Compute (first time) or recompute (refresh) the mask before this step."""
        if step < self.dense_steps:
            return False
        since = step - self.dense_steps
        return since == 0 or (self.refresh_every > 0 and since % self.refresh_every == 0)

    def is_full_step(self, step: int) -> bool:
        """A sparse-phase step that all-reduces and updates the whole model (core/full)."""
        return (self.core_full is not None and step >= self.dense_steps
                and self.core_full.is_full(step - self.dense_steps))

    def sends_dense(self, step: int) -> bool:
        """Whether this step's gradient sync sends every entry (dense phase or full step)."""
        return self.is_dense_phase(step) or self.is_full_step(step)

    def mask_steps(self) -> list[int]:
        return [s for s in range(self.steps) if self.mask_due(s)]


@dataclass(frozen=True)
class LRSchedule:
    """Learning-rate factor in [min_ratio, 1] over ``total_steps``; multiply the base lr by it.

    ``warmup_steps`` ramps linearly from 1/warmup_steps to 1, then ``constant`` stays at 1,
    ``cosine`` and ``linear`` decay to ``min_ratio`` at the last step.
    """

    name: str = "constant"
    total_steps: int = 1
    warmup_steps: int = 0
    min_ratio: float = 0.0

    @classmethod
    def from_config(cls, cfg: Any, total_steps: int) -> LRSchedule:
        name = str(cfg.get("name", "constant"))
        if name not in LR_KINDS:
            raise ScheduleError(f"schedule.lr.name={name!r} is unknown; use one of {', '.join(LR_KINDS)}")
        warmup = _whole(cfg.get("warmup_steps", LRConfig.warmup_steps), "schedule.lr.warmup_steps")
        try:
            min_ratio = float(cfg.get("min_ratio", LRConfig.min_ratio))
        except (TypeError, ValueError):
            min_ratio = -1.0
        if not 0.0 <= min_ratio <= 1.0:
            raise ScheduleError(f"schedule.lr.min_ratio={cfg.get('min_ratio')!r} must be in [0, 1]")
        return cls(name=name, total_steps=_whole(total_steps, "steps", 1), warmup_steps=warmup,
                   min_ratio=min_ratio)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.name == "constant":
            return 1.0
        span = max(self.total_steps - 1 - self.warmup_steps, 1)
        t = min(max((step - self.warmup_steps) / span, 0.0), 1.0)
        decay = 0.5 * (1.0 + math.cos(math.pi * t)) if self.name == "cosine" else 1.0 - t
        return self.min_ratio + (1.0 - self.min_ratio) * decay


def set_lr(optimizer, lr: float) -> None:
    """Set every param group's learning rate (the schedule is a pure function of the step).

    A group with an ``lr_scale`` entry gets ``lr x lr_scale`` (diff pruning's gate group runs at
    ``mask.alpha_lr``, a fixed multiple of the diff's ``optim.dense_lr``).
    """
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
