"""Mask kinds: one file per ``mask/`` option, found here by their ``name``.

:data:`MASK_KINDS` maps each ``mask.name`` to its class; the ``mask/`` config group has one
YAML per entry (a test checks the two match). Adding a kind: a new file here with a
:class:`~sparsecomm.app.masks.base.MaskKind` subclass, and ``conf/mask/<name>.yaml``.
"""
from __future__ import annotations

import importlib
import pkgutil

from .base import MaskKind, Setting


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


def build_mask_kind(cfg, setting: Setting) -> MaskKind:
    """The ``mask/`` option ``cfg.name`` (an unknown name lists the known ones)."""
    try:
        kind = MASK_KINDS[cfg.name]
    except KeyError:
        raise ValueError(f"mask={cfg.name!r} is not a mask kind; choose one of {', '.join(MASK_KINDS)}") from None
    return kind(cfg, setting)


__all__ = ["MASK_KINDS", "MaskKind", "Setting", "build_mask_kind"]
