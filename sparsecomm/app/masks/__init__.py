"""Mask kinds: one file per ``mask/`` option, found here by their ``name``.

:data:`MASK_KINDS` maps each ``mask.name`` to its class; the ``mask/`` config group has one
YAML per entry (a test checks the two match). Adding a kind: a new file here with a
:class:`~sparsecomm.app.masks.base.MaskKind` subclass, and ``conf/mask/<name>.yaml``.
"""
from __future__ import annotations

import importlib
import pkgutil

from .base import MaskKind, Setting
from .dense import DenseKind


def _discover() -> dict[str, type[MaskKind]]:
    kinds: dict[str, type[MaskKind]] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, MaskKind) and obj.__module__ == module.__name__ \
                    and "name" in vars(obj):
                kinds[obj.name] = obj
    return dict(sorted(kinds.items()))


MASK_KINDS: dict[str, type[MaskKind]] = _discover()


def build_mask_kind(cfg, setting: Setting, *, comm: str | None = None) -> MaskKind:
    """The ``mask/`` option ``cfg.name`` (an unknown name lists the known ones). ``comm``: the name
    of a ``comm/`` option that sends every entry; the kind is built (its fields checked against the
    model) but unused: the run trains densely (an :class:`UnusedKind`)."""
    try:
        kind = MASK_KINDS[cfg.name](cfg, setting)
    except KeyError:
        raise ValueError(f"mask={cfg.name!r} is not a mask kind; choose one of {', '.join(MASK_KINDS)}") from None
    return kind if comm is None or kind.dense else UnusedKind(kind.name, comm, setting)


class UnusedKind(DenseKind):
    """The dense kind standing in for a mask kind that a ``comm/`` option leaves unused (it sends
    every entry): every step trains every entry with the dense optimizer; the summary says
    ``mask: unused`` and the log names the configured kind."""

    def __init__(self, configured: str, comm: str, setting: Setting):
        super().__init__({"always": []}, setting)
        self.name, self.configured, self.comm = "unused", configured, comm

    def notes(self) -> list[str]:
        optim = self.setting.optim
        lr = f" at optim.dense_lr={optim.dense_lr:g}" if optim is not None else ""
        unused = f"mask={self.configured} and optim.lr are" if optim is not None else f"mask={self.configured} is"
        return [f"comm={self.comm}: every entry trains (dense optimizer){lr}; {unused} unused"]


__all__ = ["MASK_KINDS", "MaskKind", "Setting", "UnusedKind", "build_mask_kind"]
