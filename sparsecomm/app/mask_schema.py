"""The ``mask`` group's schema: one dataclass per mask kind (``conf/mask/<kind>.yaml`` extends it).

Part of the typed config (:mod:`sparsecomm.app.schema`, which lists these in ``OPTIONS["mask"]``):
each dataclass gives its fields' types and defaults and checks its own values
(:class:`~sparsecomm.app.fields.Option`); the kind's code is ``sparsecomm/app/masks/<kind>.py``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, List, Optional

from omegaconf import II, MISSING

from sparsecomm.diff_pruning import _check_gate_args
from sparsecomm.fisher import METHODS
from sparsecomm.mask import check_density
from sparsecomm.width_core import check_fraction
from .fields import GB, NATURAL, SEED, ConfigError, Option, check_choice, show


# --- mask/: which entries train and travel (sparsecomm/app/masks/) ------------------------------


@dataclass
class MaskConfig(Option):
    sparse: ClassVar[bool] = True  # trains and sends a subset of the entries after the dense steps
    name: str = MISSING

    def check(self, cfg: Any) -> None:
        check_choice(self.name, "mask.name", tuple(MASK_OPTIONS), "use " + ", ".join(f"mask={k}" for k in MASK_OPTIONS))


@dataclass
class DenseMask(MaskConfig):
    """No mask: plain DDP."""

    sparse = False


@dataclass
class SparseMask(MaskConfig):
    union_types = {"always": (str, list, None)}
    density: float = 0.005  # fraction of all entries kept (the classifier head counts toward it)
    always: Any = None  # glob pattern(s) kept whole; null: the task's classifier head

    def check(self, cfg: Any) -> None:
        super().check(cfg)
        check_density(self.density, field="mask.density")
        if not (self.always is None or isinstance(self.always, str) or all(isinstance(p, str) for p in self.always)):
            raise ConfigError(f"mask.always={show(self.always)} must be a glob pattern or a list of them, e.g. "
                              f"mask.always='[fc.*]'")


@dataclass
class FisherMask(SparseMask):
    bounds = {"num_samples": NATURAL, "batch_size": NATURAL, "chunk_size": NATURAL}
    num_samples: int = 256  # examples scored in total, split over the ranks
    method: str = "empirical"  # empirical (true labels) | expected (every class, weighted by p(c|x))
    batch_size: int = 64  # scoring batch per rank
    chunk_size: int = 32  # examples per vectorised gradient chunk (memory knob)

    def check(self, cfg: Any) -> None:
        super().check(cfg)
        check_choice(self.method, "mask.method", METHODS)


@dataclass
class RandomMask(SparseMask):
    bounds = {"seed": SEED}
    seed: int = II("seed")


@dataclass
class FileMask(MaskConfig):
    path: str = MISSING  # the .safetensors mask file, e.g. mask.path=outputs/<run>/mask.safetensors

    def check(self, cfg: Any) -> None:
        super().check(cfg)
        if not os.path.isfile(str(self.path)):
            raise ConfigError(f"mask.path={self.path!r} is not a file; point it at a saved mask, e.g. "
                              f"mask.path=outputs/<run>/mask.safetensors")


@dataclass
class DiffPruningMask(SparseMask):
    # the gates: sigmoid saturates long before these bounds; beyond them float32 overflows
    bounds = {"l0_steps": NATURAL, "log_alpha_init": (-100, 100, False), "temperature": (0, 100, True),
              "alpha_lr": (0, 1e3, True), "l0_penalty": (0, 1e3, False)}
    l0_steps: int = 100  # steps of the L0 phase, after schedule.dense_steps (their sum must be < steps)
    l0_penalty: float = 1.25e-7  # lambda on the expected L0 norm; it sums over n entries: scale it with the model
    alpha_lr: float = 0.1  # learning rate of log_alpha (the reference implementation's); w uses optim.dense_lr
    structured: bool = False  # one extra gate per parameter tensor (structured diff pruning)
    ungated_head: bool = True  # the head gets a plain dense diff (no gate, no penalty), as the reference code
    stretch: List[float] = field(default_factory=lambda: [-1.5, 1.5])  # hard-concrete stretch interval (l, r)
    log_alpha_init: float = 5.0  # the paper's: P(gate open) = sigmoid(5) = 0.993 at the start
    temperature: float = 1.0  # the paper's gate has no temperature (= 1); Louizos et al. used 2/3

    def check(self, cfg: Any) -> None:
        super().check(cfg)
        try:
            _check_gate_args(*(float(v) for v in self.stretch), self.temperature)
        except (TypeError, ValueError):
            raise ConfigError(f"mask.stretch={show(self.stretch)} must be [l, r] with l < 0 and r > 1, e.g. "
                              f"mask.stretch=[-1.5,1.5]") from None
        dense, steps = cfg.schedule.dense_steps, cfg.steps
        if dense + self.l0_steps >= steps:
            raise ConfigError(f"mask.l0_steps={self.l0_steps} leaves no fixed-mask step: schedule.dense_steps={dense} "
                              f"+ mask.l0_steps={self.l0_steps} must be < steps={steps}; lower mask.l0_steps or "
                              f"raise steps")
        if cfg.schedule.refresh_every:
            raise ConfigError(f"schedule.refresh_every={cfg.schedule.refresh_every} with mask=diff_pruning: the "
                              f"diff-pruning mask is projected once, after the L0 phase; use schedule.refresh_every=0 "
                              f"(e.g. schedule=fish_fixed)")


@dataclass
class WidthCoreMask(MaskConfig):
    bounds = {"alone_lr": GB}
    fraction: float = 0.5  # of each hidden layer's units (ceil), in (0, 1]
    nested: bool = True  # keep the core a standalone subnetwork (sparsecomm.width_core.NestedCore)
    compare_alone: bool = False  # also train the same core architecture alone (plain DDP)
    alone_lr: Optional[float] = None  # lr of that run; null: optim.dense_lr

    def check(self, cfg: Any) -> None:
        super().check(cfg)
        check_fraction(self.fraction, field="mask.fraction")


# mask.name -> its schema: one entry per conf/mask/<kind>.yaml (tests check both ways)
MASK_OPTIONS: dict[str, type[MaskConfig]] = {
    "dense": DenseMask, "fisher": FisherMask, "random": RandomMask, "file": FileMask,
    "diff_pruning": DiffPruningMask, "width_core": WidthCoreMask}
