"""The app's config composed once per process, so that a bad override fails in one line.

:func:`create_hydra` makes the Hydra instance of the app's configs (the package ``sparsecomm.conf``;
``--config-dir`` / ``--config-path`` as Hydra takes them); :func:`compose_app` composes
``conf/train.yaml`` with the command line's overrides through it, Hydra's own node included, as
Hydra would for the run or the sweep. Every key must be a field some config defines
(:func:`check_keys`), every value must have its field's type (the schema,
:mod:`sparsecomm.app.schema`; Hydra's own error becomes our one-line ConfigError), and
:func:`sparsecomm.app.config.check_config` checks the rest. The app then runs with this very
config (:mod:`sparsecomm.app.hydra_run`). Only a failure composes again, to explain itself: the
config of the same group choices, no value overridden, says what each field takes.
A sweep's jobs are composed by Hydra's launcher, one config per job, and checked by the job.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import os
from importlib.resources import files

from hydra._internal.hydra import Hydra
from hydra._internal.utils import create_automatic_config_search_path
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, nodes, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from .config import ConfigError, check_config, composition_error
from .hints import unparsable_override
from .schema import OPTIONS

CONFIG_MODULE = "sparsecomm.conf"
CONFIG_NAME = "train"
TASK_NAME = "train"  # hydra.job.name: the name Hydra gives the app's jobs


def parse_overrides(overrides: list[str]):
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
    for o in parse_overrides(overrides):
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


def create_hydra(config_dir: str | None = None, config_path: str | None = None) -> Hydra:
    """The (global) Hydra instance that composes the app's configs: the package's, or those of
    ``config_path``, with ``config_dir`` searched first (Hydra's ``--config-path``, ``--config-dir``)."""
    search_path = create_automatic_config_search_path(None, None, config_path or f"pkg://{CONFIG_MODULE}")
    if config_dir is not None:
        if not os.path.isdir(config_dir):
            raise ConfigError(f"--config-dir {config_dir}: no such folder; point it at a folder of configs")
        search_path.prepend(provider="command-line", path=f"file://{os.path.abspath(config_dir)}",
                            anchor="schema")
    GlobalHydra.instance().clear()
    return Hydra.create_main_hydra2(task_name=TASK_NAME, config_search_path=search_path)


def compose_app(hydra: Hydra, config_name: str, overrides: list[str], *, multirun: bool = False,
                check: bool = True, known_keys: bool = True) -> DictConfig:
    """The app's config for the command line's ``overrides``, Hydra's node included, composed once.

    Type errors are one-line ConfigErrors; ``check``: also :func:`sparsecomm.app.config.check_config`;
    ``known_keys``: every key must be a field the configs define (off for a user's own configs).
    ``multirun``: the sweep's config (its sweep overrides are the jobs', checked by each job).
    """
    mode = RunMode.MULTIRUN if multirun else RunMode.RUN
    parsed = parse_overrides(overrides)
    explain = _Explainer(hydra, config_name, overrides, parsed)
    try:
        cfg = hydra.compose_config(config_name, [*overrides, f"hydra.mode={mode.name}"], run_mode=mode)
    except Exception as e:  # noqa: BLE001 - OmegaConf can fail with an AttributeError (a mapping into a null node)
        if known_keys:
            check_keys(overrides, explain.base())
        raise explain.failure(e) from None
    for o in parsed:
        if o.is_delete() or o.key_or_group in explain.groups or _is_hydras(o.key_or_group):
            continue
        if known_keys and (o.is_add() or o.is_force_add() or o.is_sweep_override()) and not _schema_field(cfg, o):
            check_keys(overrides, explain.base())
        for value in _values(o):  # a sweep's values are typed here, before any job starts
            if _refused(cfg, o.key_or_group, value):
                raise composition_error(None, explain.base(), [f"{o.key_or_group}={value}"], key=o.key_or_group)
    if check:
        check_config(job_config(cfg))
    return cfg


def job_config(cfg: DictConfig) -> DictConfig:
    """``cfg`` without Hydra's node: what the app's task function gets."""
    job = copy.deepcopy(cfg)
    with read_write(job), open_dict(job):
        job.pop("hydra", None)
    return job


def compose_config(overrides: list[str], config_name: str = CONFIG_NAME) -> DictConfig:
    """The app's config for ``overrides`` (``conf/train.yaml`` + the schema) without Hydra's node,
    composed as the app does: type errors as one-line ConfigErrors, no other check. Hydra's global
    state is left clear."""
    try:
        return job_config(compose_app(create_hydra(), config_name, overrides, check=False))
    finally:
        GlobalHydra.instance().clear()


def _is_hydras(key: str) -> bool:
    return key.split(".")[0].split("/")[0] == "hydra"


def _schema_field(cfg: DictConfig, o: Override) -> bool:
    """Does the schema of the node ``o`` adds to (``+key``/``++key``) define the field?"""
    parent, _, leaf = o.key_or_group.rpartition(".")
    node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
    schema = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
    if not dataclasses.is_dataclass(schema):
        return False  # not a node of the schema: check_keys judges it
    return leaf in {f.name for f in dataclasses.fields(schema)}


def _values(o: Override) -> list[str]:
    """The values ``o`` sets, as typed: one, or each of a sweep's."""
    if o.is_sweep_override():
        return list(o.sweep_string_iterator())
    return [o.input_line.split("=", 1)[1]] if "=" in o.input_line else []


def _refused(cfg: DictConfig, key: str, text: str) -> bool:
    """Would the field ``key`` of ``cfg`` refuse the value ``text``? OmegaConf takes 0, 1, "yes", ...
    for a boolean field; the app wants true or false. Interpolations are checked once resolved."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
    field = node._get_node(leaf) if isinstance(node, DictConfig) and leaf in node else None
    if not isinstance(field, nodes.ValueNode) or isinstance(field, nodes.AnyNode) or text.startswith("${"):
        return False
    value = OverridesParser.create().parse_override(f"{key}={text}").value()
    if value is None:
        return not field._is_optional()
    if isinstance(field, nodes.BooleanNode) and not isinstance(value, bool):
        return True
    try:
        field.validate_and_convert(value)
    except OmegaConfBaseException:
        return True
    return False


# The bases composed so far in this process (_Explainer.base): the configs' files do not change under a run.
_BASES: dict[tuple, DictConfig] = {}


class _Explainer:
    """Why a composition failed, in one line: composes what it needs only when asked."""

    def __init__(self, hydra: Hydra, config_name: str, overrides: list[str], parsed: list[Override]) -> None:
        self.hydra, self.config_name, self.overrides = hydra, config_name, overrides
        self.groups = config_groups()
        self.choices = [o.input_line for o in parsed if o.key_or_group in self.groups and not o.is_sweep_override()]
        self.values = [o for o in parsed if o.key_or_group not in self.groups and not o.is_delete()
                       and not o.is_sweep_override()]
        self._base: DictConfig | None = None

    def compose(self, overrides: list[str]) -> DictConfig:
        return self.hydra.compose_config(self.config_name, overrides, run_mode=RunMode.RUN)

    def base(self) -> DictConfig:
        """The config of the same group choices, no value overridden (its fields say their types):
        composed once per process for each search path, config and choices (read-only, shared by
        every explanation that needs it: a process that composes many configs, a sweep's or a
        test's, pays for each base once)."""
        if self._base is None:
            search_path = tuple((e.provider, e.path) for e in self.hydra.config_loader.get_search_path().get_path())
            key = (search_path, self.config_name, tuple(self.choices))
            if key not in _BASES:
                base = self.compose(self.choices)
                OmegaConf.set_readonly(base, True)
                _BASES[key] = base
            self._base = _BASES[key]
        return self._base

    def failure(self, exc: BaseException) -> BaseException:
        """The ConfigError for ``exc`` naming the value that alone makes composition fail; else ``exc``."""
        if isinstance(exc, MissingConfigException) or not any(True for _ in self.values):
            return exc
        try:
            base = self.base()
        except Exception:  # noqa: BLE001 - the group choices alone fail: Hydra's error says why
            return exc
        error = composition_error(exc, base, self.overrides)
        hydras = isinstance(exc, (HydraException, OmegaConfBaseException))
        for o in self.values if error is None and not hydras else ():
            try:
                self.compose([*self.choices, o.input_line])
            except Exception as e:  # noqa: BLE001
                error = composition_error(e, base, self.overrides, key=o.key_or_group)
                break
        return error or exc
