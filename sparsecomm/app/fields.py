"""The app's one whole-number check, shared by the modules that read config values.

A leaf (it imports nothing of the app): :mod:`sparsecomm.app.schedule`, :mod:`sparsecomm.app.launch`
and :mod:`sparsecomm.app.config` all use it. It raises the caller's error type with a message that
names the field and the fix.
"""
from __future__ import annotations

from typing import Any


def whole_number(value: Any, field: str, minimum: int = 0, error: type[ValueError] = ValueError) -> int:
    """``int(value)`` if it is a whole number >= ``minimum`` (not a bool), else ``error``."""
    try:
        v = int(value)
        if isinstance(value, bool) or v != float(value):
            raise ValueError
    except (TypeError, ValueError):
        raise error(f"{field}={value!r} is not a whole number; use an integer >= {minimum}") from None
    if v < minimum:
        raise error(f"{field}={value!r} must be >= {minimum}")
    return v
