"""The interface every mask kind implements (``mask/`` in the config, one kind per file here).

A kind builds the run's shared mask (identical on every rank) and may take part in the step
through a few hooks, all no-ops by default::

    MaskKind(cfg.mask, setting)       checks its fields against the model now (errors name them)
    .plan(schedule)                   the step plan it needs (diff pruning: its L0 phase)
    .before_step(run, step, dense)    e.g. enter diff pruning's L0 phase; width core: nesting on
    .extra_loss()                     a term added to the loss (diff pruning's L0 penalty) or None
    .after_step()                     e.g. the width core re-zeroes its cut weights
    .new_mask(run, step)              the mask at a mask step (default: next_mask(run.model); collective)
    .outputs(run) / report_lines(s)   summary fields at the end (collective) and their report lines
    .state_dict() / load_state_dict() its part of a checkpoint; before_load(run, step) first

``run`` is the trainer, used through a narrow surface: ``run.model``, ``run.sync.bytes_sent``,
``run.swap_model(module, optimizer, dense_bytes_per_step=...)``, ``run.log``, and for
``outputs`` its task, data, config and device.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from sparsecomm.mask import Mask, count_for_density, matches_any

from ..config import ConfigError
from ..schedule import Schedule


@dataclass
class Setting:
    """What a kind may read at construction: the task (head, loss), this rank's data, the model."""

    task: Any
    data: Any
    model: torch.nn.Module
    seed: int


class MaskKind:
    """A mask kind: subclasses set ``name`` (the ``mask/`` option it implements) and ``build``."""

    name: ClassVar[str]
    dense: ClassVar[bool] = False  # plain DDP: no mask, no hook

    def __init__(self, cfg: Mapping, setting: Setting):
        self.cfg, self.setting = cfg, setting
        always = cfg.get("always")
        head = setting.task.head
        self.always: tuple[str, ...] = tuple(head if always is None else ([always] if isinstance(always, str) else always))
        self.rounds = 0          # masks built so far (a Fisher mask's data order depends on it)
        self.score_bytes = 0     # what choosing masks put on the network (Fisher: the score exchange)
        self.k = 0               # entries the mask selects

    def plan(self, schedule: Schedule) -> Schedule:
        return schedule

    def build(self, model: torch.nn.Module) -> Mask:
        raise NotImplementedError

    def new_mask(self, run, step: int) -> Mask:
        """The mask for ``step`` (collective: every rank calls it at the same step)."""
        return self.next_mask(run.model)

    def next_mask(self, model: torch.nn.Module) -> Mask:
        """The next mask of ``model`` (collective), counted in ``rounds`` (a Fisher mask's data order
        depends on it): what a loop without the trainer calls (the benchmark workers)."""
        mask = self.build(model)
        self.rounds += 1
        return mask

    def before_step(self, run, step: int, dense: bool) -> None:
        pass

    def extra_loss(self) -> torch.Tensor | None:
        return None

    def after_step(self) -> None:
        pass

    def outputs(self, run) -> dict[str, Any]:
        return {}

    @staticmethod
    def report_lines(summary: Mapping[str, Any]) -> list[str]:
        return []

    def before_load(self, run, step: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "score_bytes": self.score_bytes}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        self.rounds, self.score_bytes = int(sd["rounds"]), int(sd["score_bytes"])


class DensityKind(MaskKind):
    """A kind that keeps a fraction ``mask.density`` of all entries, ``always`` among them."""

    def __init__(self, cfg: Mapping, setting: Setting):
        super().__init__(cfg, setting)
        params = dict(setting.model.named_parameters())
        numel = sum(p.numel() for p in params.values())
        self.k = count_for_density(cfg.density, numel, field="mask.density")
        whole = sum(p.numel() for n, p in params.items() if matches_any(n, self.always))
        if whole > self.k:
            raise ConfigError(
                f"mask.density={cfg.density} keeps k={self.k} of {numel} entries, fewer than the {whole} entries "
                f"of the parameters always kept ({list(self.always)}); raise mask.density to at least "
                f"{whole / numel:.3g} or set mask.always=[]")
