"""The app's config composed before Hydra runs the app, so that a bad override fails in one line.

:func:`preflight` composes ``conf/train.yaml`` with the command line's overrides (Hydra's compose
API): every key must be a field some config defines (:func:`check_keys`), every value must have its
field's type (the schema, :mod:`sparsecomm.app.schema`; Hydra's own error becomes our one-line
ConfigError, :func:`compose_checked`), and :func:`sparsecomm.app.config.check_config` checks the
rest, for each value of a sweep. :func:`compose_config` composes as the app does, without the checks.
"""
from __future__ import annotations

import difflib
from importlib.resources import files

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config import ConfigError, check_config, composition_error, strict_bool_error
from .hints import unparsable_override
from .schema import OPTIONS

CONFIG_MODULE = "sparsecomm.conf"
CONFIG_NAME = "train"


def _parse_overrides(overrides: list[str]):
    """Hydra's parse of the overrides; an override it cannot read is a ConfigError showing the quoting to use."""
    parser = OverridesParser.create()
    try:
        return parser.parse_overrides(overrides)
    except OverrideParseException as e:
        for line in overrides:
            try:
                parser.parse_override(line)
            except HydraException as bad:
                raise ConfigError(unparsable_override(line, bad)) from None
        raise ConfigError(unparsable_override(" ".join(overrides), e)) from None


def config_groups() -> set[str]:
    """The config groups under ``sparsecomm.conf`` (``mask``, ``schedule/lr``, ...), Hydra's excluded."""
    root = files(CONFIG_MODULE)
    groups, todo = set(), [("", root)]
    while todo:
        prefix, node = todo.pop()
        for child in node.iterdir():
            if child.is_dir() and not child.name.startswith(("_", ".")) and child.name != "hydra":
                name = f"{prefix}{child.name}"
                groups.add(name)
                todo.append((f"{name}/", child))
    return groups


def check_keys(overrides: list[str], base: DictConfig) -> None:
    """Every ``key=value`` (also ``+key``/``++key``) must name a field the app reads.

    ``base`` is the config composed with the config-group choices alone. Hydra's own message for
    an unknown key suggests ``+key=value``, which would add a field nothing reads (a typo such as
    ``+mask.densty=0.01`` would train at the default density): both are refused here, naming the
    closest field. ``++key=value`` may name a field of another option of the key's group (it is
    then not read, as with Hydra). ``hydra.*`` keys are Hydra's own.
    """
    groups = config_groups()
    for o in _parse_overrides(overrides):
        key = o.key_or_group
        if o.is_delete() or key in groups or key.split(".")[0].split("/")[0] == "hydra":
            continue
        if _has_field(base, key):
            continue
        if o.is_force_add() and _defined_by_another_option(key, groups):
            continue  # ++: set where the chosen option has the field (one command line for several options)
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(base, parent, default=None) if parent else base
        known = [str(k) for k in node.keys() if str(k) != "hydra"] if isinstance(node, DictConfig) else []
        close = difflib.get_close_matches(leaf, known, n=1, cutoff=0.6)
        where = f"{parent}." if parent else ""
        hint = (f"did you mean {where}{close[0]}?" if close else
                (f"the fields of {parent or 'the config'} are: {', '.join(known)}" if known else
                 f"{parent} has no fields"))
        plus = "; '+' cannot add a field: the app reads only those its configs define" \
            if (o.is_add() or o.is_force_add()) else ""
        raise ConfigError(f"{o.input_line}: no config field {key} ({hint}){plus}")


def _has_field(cfg: DictConfig, key: str) -> bool:
    """``key`` (dotted) is a field of ``cfg``, set or mandatory (``???``)."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
    return isinstance(node, DictConfig) and leaf in node.keys()


def _defined_by_another_option(key: str, groups: set[str]) -> bool:
    """Does the schema of some option of the config group that ``key`` falls in define it (``mask.num_samples``)?"""
    for group in sorted(groups, key=len, reverse=True):
        prefix = group.replace("/", ".") + "."
        if key.startswith(prefix):
            return any(_has_field(OmegaConf.structured(node), key[len(prefix):])
                       for node in OPTIONS.get(group, {}).values())
    return False


def compose_checked(config_name: str, overrides: list[str], base: DictConfig) -> DictConfig:
    """Hydra's ``compose``, a value its field's type refuses raised as our one-line ConfigError.

    ``base``: the config of the same group choices, no value overridden (see :func:`preflight`).
    """
    groups = config_groups()
    for o in _parse_overrides(overrides):
        if not (o.key_or_group in groups or o.is_delete() or o.is_sweep_override()):
            error = strict_bool_error(base, o.key_or_group, o.value(), overrides)
            if error is not None:
                raise error
    try:
        return compose(config_name=config_name, overrides=overrides)
    except Exception as e:  # noqa: BLE001 - OmegaConf can fail with an AttributeError (a mapping into a null node)
        error = composition_error(e, base, overrides)
        if error is None and not isinstance(e, (HydraException, OmegaConfBaseException)):
            error = _blame(config_name, overrides, base)
        if error is None:
            raise
        raise error from None


def _blame(config_name: str, overrides: list[str], base: DictConfig) -> ConfigError | None:
    """The ConfigError for the first value override that alone makes ``compose`` fail (None: none does)."""
    groups = config_groups()
    choices = [o.input_line for o in _parse_overrides(overrides) if o.key_or_group in groups]
    for o in _parse_overrides(overrides):
        if o.key_or_group in groups or o.is_delete():
            continue
        try:
            compose(config_name=config_name, overrides=[*choices, o.input_line])
        except Exception as e:  # noqa: BLE001
            return composition_error(e, base, overrides, key=o.key_or_group)
    return None


def compose_config(overrides: list[str], config_name: str = CONFIG_NAME) -> DictConfig:
    """The app's config for ``overrides`` (``conf/train.yaml`` + the schema), composed as the app
    does: type errors as one-line ConfigErrors, no other check (:func:`preflight` also checks)."""
    parsed = _parse_overrides(overrides)
    groups = config_groups()
    choices = [o.input_line for o in parsed if o.key_or_group in groups]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            return compose_checked(config_name, overrides, compose(config_name=config_name, overrides=choices))
    finally:
        GlobalHydra.instance().clear()


def preflight(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose and check the config before Hydra runs, so bad overrides fail in one line.

    The schema (:mod:`sparsecomm.app.schema`) types every field while Hydra composes; the rest is
    :func:`sparsecomm.app.config.check_config`. A multirun's sweep overrides (``a=1,2``) are
    checked value by value.
    """
    parsed = _parse_overrides(overrides)
    groups = config_groups()
    sweeps = [o for o in parsed if o.is_sweep_override()]
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    choices = [o.input_line for o in parsed if o.key_or_group in groups and not o.is_sweep_override()]
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        base = compose(config_name=config_name, overrides=choices)
        check_keys(overrides, base)
        cfg = compose_checked(config_name, fixed, base)
        check_config(cfg)
        for o in sweeps:
            for value in o.sweep_string_iterator():
                point = compose_checked(config_name, [*fixed, f"{o.get_key_element()}={value}"], base)
                check_config(point)
    return cfg
