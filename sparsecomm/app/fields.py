"""The app's config errors and the checks of single values that every config option shares.

A leaf (it imports nothing of the app): the schema's options (:mod:`sparsecomm.app.schema`) check
their own fields with these, and :mod:`sparsecomm.app.schedule`, :mod:`sparsecomm.app.launch` and
:mod:`sparsecomm.app.config` use them too. Every message names the field and the fix.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

from omegaconf import DictConfig, ListConfig, OmegaConf


class ConfigError(ValueError):
    """A config value the app cannot run with; the message names the field and the fix.

    ``collective``: a function of the config, which every rank holds alike, so every rank raises it
    and rank 0's line is enough.
    """

    collective = True


class ClusterError(ConfigError):
    """The cluster config does not fit this machine or environment; the message names the field."""

    collective = False  # also raised by one node's environment (its GPUs, its scontrol)


GB = (0, None, True)  # a range for ``Option.bounds``: a number > 0
NATURAL = (1, None, False)  # a count >= 1
SEED = (0, 2**63 - 1, False)
KINDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string", list: "a list",
         dict: "a mapping", None: "null"}


def show(value: Any) -> str:
    """``value`` as a user typed it, cut to 60 characters."""
    text = repr(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)
    return text if len(text) <= 60 else text[:57] + "..."


def kind_of(value: Any) -> type | None:
    """The type a field's value has, in the words of :data:`KINDS` (lists and mappings as such)."""
    if value is None:
        return None
    if isinstance(value, (ListConfig, list, tuple)):
        return list
    if isinstance(value, (DictConfig, Mapping)):
        return dict
    return type(value)


def check_types(value: Any, field: str, types: tuple) -> None:
    """A field the schema types ``Any`` holds one of ``types`` (``None``: null; an int field takes 3.0)."""
    kind = kind_of(value)
    if kind in types or (kind is float and int in types and float(value).is_integer()):
        return
    want = " or ".join(KINDS[t] for t in types if not (t is int and float in types))
    raise ConfigError(f"{field}={show(value)} must be {want}")


def check_range(value: Any, field: str, low: float, high: float | None, low_exclusive: bool) -> None:
    """A number lies in [low, high] (``(low, high]`` when ``low_exclusive``; ``high`` None: unbounded).
    Values that are not numbers are the schema's to refuse, not this check's."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    bad = (not math.isfinite(value) or (value <= low if low_exclusive else value < low)
           or (high is not None and value > high))
    if bad:
        span = f"{'>' if low_exclusive else '>='} {low}" + (f" and <= {high:g}" if high is not None else "")
        raise ConfigError(f"{field}={show(value)} is out of range: it must be {span}")


def check_choice(value: Any, field: str, choices: tuple, how: str = "",
                 error: type[ConfigError] = ConfigError) -> None:
    """``value`` is one of ``choices``; ``how``: the fix, when "use one of ..." is not it."""
    if value not in choices:
        raise error(f"{field}={value!r} is unknown; {how or 'use one of ' + ', '.join(map(str, choices))}")


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


class Option:
    """What a config dataclass says about its own fields (:mod:`sparsecomm.app.schema`).

    :func:`sparsecomm.app.config.check_config` asks every option of the composed config, in the
    same words for each, never a kind by its name: first :meth:`check_fields` (the tables), then
    :meth:`check` (the option's own rules). A subclass adds to its parents' tables.
    """

    bounds: ClassVar[dict[str, tuple]] = {}  # field -> (low, high, low exclusive); high None: unbounded
    union_types: ClassVar[dict[str, tuple]] = {}  # the fields typed Any -> the types they take (None: null)

    @classmethod
    def table(cls, name: str) -> dict[str, tuple]:
        """``bounds`` or ``union_types`` of this class and its parents (the nearest wins)."""
        merged: dict[str, tuple] = {}
        for klass in reversed(cls.__mro__):
            merged.update(vars(klass).get(name, {}))
        return merged

    def check_fields(self, path: str) -> None:
        """Each field of ``union_types`` holds one of its types, each of ``bounds`` lies in range;
        ``path``: where the option sits in the config (``mask.``)."""
        for name, types in self.table("union_types").items():
            check_types(getattr(self, name), path + name, types)
        for name, (low, high, exclusive) in self.table("bounds").items():
            check_range(getattr(self, name), path + name, low, high, exclusive)

    def check(self, cfg: Any) -> None:
        """The option's own rules beyond types and ranges; ``cfg``: the whole config, for a rule
        that reads another group's value. Raises :class:`ConfigError` naming the field and the fix."""
