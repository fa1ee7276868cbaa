"""The interface every mask kind implements (``mask/`` in the config, one kind per file here).

A kind builds the run's shared mask (identical on every rank) and takes part in the run through
a few points, all no-ops by default. A kind never receives the trainer: at each point it reads a
:class:`View` (the model, the step, the bytes sent so far, the task, data and device) and
RETURNS what changes, a :class:`Change`, which the trainer applies::

    MaskKind(cfg.mask, setting)       checks its fields against the model now (errors name them)
    .plan(schedule)                   the step plan it needs (diff pruning: its L0 phase)
    .before_step(view)     -> Change  e.g. diff pruning swaps in its L0 wrapper; width core: nesting on
    .extra_loss()                     a term added to the loss (diff pruning's L0 penalty) or None
    .local_gradient(name, grad)       each parameter's LOCAL gradient, before DDP all-reduces it
                                      (only when ``wants_local_gradients``): statistics, nothing sent
    .after_backward(view)             after backward and the all-reduce, before the optimizer
    .after_step(view)      -> Change  e.g. the width core re-zeroes its cut weights
    .new_mask(view)        -> Change  the mask at a mask step (default: next_mask(view.model); collective)
    .outputs(view)         -> Change  summary fields at the end (collective), lines, a comparison to train
    .report_lines(summary)            the report's lines about those fields
    .notes()                          lines for the log at start
    .before_load(view)     -> Change  before a checkpoint loads (diff pruning: a checkpoint inside L0)
    .state_dict() / load_state_dict() its part of a checkpoint

Nothing here crosses the network except what a kind's own ``build`` sends (the Fisher score
exchange, counted in ``score_bytes``).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from sparsecomm.mask import Mask, count_for_density, matches_any

from ..config import ConfigError
from ..schedule import Schedule


@dataclass
class Setting:
    """What a kind may read at construction: the task (head, loss), this rank's data, the model,
    the seed and ``optim/`` (a kind that builds its own optimizer: diff pruning's L0 phase)."""

    task: Any
    data: Any
    model: torch.nn.Module
    seed: int
    optim: Any = None


@dataclass(frozen=True)
class View:
    """What a kind reads at a point of the run (the trainer builds it; a kind never sees the trainer)."""

    model: torch.nn.Module    # the model trained now (not its DDP wrapper)
    step: int                 # the step about to run (at the end: the steps done)
    dense: bool               # whether this step sends dense gradients
    bytes_sent: int           # gradient bytes this rank has handed to all-reduce so far
    grad_bytes: int           # bytes of one dense all-reduce of ``model``'s gradients
    task: Any
    data: Any
    device: torch.device


@dataclass
class Comparison:
    """A model the trainer trains ALONE after the run, through its own loop: plain DDP, the dense
    optimizer (at ``lr``, default ``optim/``'s), the run's lr schedule and number of steps, a fresh
    stream of the same per-rank batches; then evaluates it. The summary gains ``<prefix>_acc``,
    ``<prefix>_loss``, ``<prefix>_bytes`` (what its all-reduces sent, ``numel x 4`` a step) and
    ``<prefix>_lr``; the log a line starting with ``label``."""

    model: torch.nn.Module
    prefix: str
    label: str
    lr: float | None = None

    def fields(self, result: Mapping[str, float], bytes_sent: int, lr: float) -> dict[str, Any]:
        """The summary fields of the trained comparison (``result``: its evaluation)."""
        p = self.prefix
        return {f"{p}_acc": result["test_acc"], f"{p}_loss": result["test_loss"], f"{p}_bytes": bytes_sent,
                f"{p}_lr": lr}

    def line(self, result: Mapping[str, float], steps: int, lr: float) -> str:
        """Its log line."""
        return f"{self.label} ({steps} steps, lr {lr:g}): test accuracy {result['test_acc']:.4f}"


@dataclass
class Change:
    """What a kind asks the trainer to apply; every field optional.

    ``mask``: the new mask (the hook, the masked optimizer, the task diff's union; rank 0 saves it).
    ``dense``: this step's mode instead of the schedule's. ``model``: train this module from now
    on (a new DDP and hook; the byte counters go on), with ``optimizer`` = (dense optimizer, lr)
    (default ``optim/``'s dense one) and ``dense_bytes_per_step`` (what dense DDP of the plain
    model sends a step, when ``model`` all-reduces another amount). ``base``: the task diff's base
    (the first one given wins). ``records``: ``(name, fields)`` for ``metrics.jsonl`` at this step;
    ``lines``: log lines; ``fields``: summary fields; ``compare``: see :class:`Comparison`.
    """

    mask: Mask | None = None
    dense: bool | None = None
    model: torch.nn.Module | None = None
    optimizer: tuple[torch.optim.Optimizer, float] | None = None
    dense_bytes_per_step: int | None = None
    base: torch.nn.Module | None = None
    records: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    fields: dict[str, Any] = field(default_factory=dict)
    compare: Comparison | None = None


class MaskKind:
    """A mask kind: subclasses set ``name`` (the ``mask/`` option it implements) and ``build``."""

    name: ClassVar[str]
    dense: ClassVar[bool] = False  # plain DDP: no mask, no hook
    wants_local_gradients: ClassVar[bool] = False  # the trainer then calls local_gradient every backward

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

    def new_mask(self, view: View) -> Change:
        """The mask for ``view.step`` (collective: every rank calls it at the same step)."""
        return Change(mask=self.next_mask(view.model))

    def next_mask(self, model: torch.nn.Module) -> Mask:
        """The next mask of ``model`` (collective), counted in ``rounds`` (a Fisher mask's data order
        depends on it)."""
        mask = self.build(model)
        self.rounds += 1
        return mask

    def before_step(self, view: View) -> Change | None:
        return None

    def extra_loss(self) -> torch.Tensor | None:
        return None

    def local_gradient(self, name: str, grad: torch.Tensor) -> None:
        """This rank's own gradient of parameter ``name``, as backward accumulates it and BEFORE DDP's
        hook all-reduces its bucket (a post-accumulate-grad hook, :func:`watch_local_gradients`).
        Read it (e.g. sum its squares), never change it: ``grad`` is a view of DDP's bucket."""

    def after_backward(self, view: View) -> None:
        """After backward, before the optimizer: ``p.grad`` holds what the hook left (on a masked
        step the k averaged entries, zeros elsewhere). Read, change nothing."""

    def after_step(self, view: View) -> Change | None:
        return None

    def outputs(self, view: View) -> Change:
        return Change()

    @staticmethod
    def report_lines(summary: Mapping[str, Any]) -> list[str]:
        return []

    def before_load(self, view: View) -> Change | None:
        return None

    def notes(self) -> list[str]:
        """Lines the run's log shows at start, after the run's own line."""
        return []

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


def watch_local_gradients(kind: MaskKind, model: torch.nn.Module) -> list[Any]:
    """Hand every trainable parameter's local gradient of ``model`` to ``kind.local_gradient`` on
    each backward (when the kind wants them). Returns the hook handles (``.remove()`` them when the
    model is swapped out). Torch runs a post-accumulate-grad hook before DDP marks the parameter
    ready, so the gradient is this rank's own; nothing crosses the network."""
    if not kind.wants_local_gradients:
        return []
    return [p.register_post_accumulate_grad_hook(lambda p, n=n: kind.local_gradient(n, p.grad))
            for n, p in model.named_parameters() if p.requires_grad]
