"""Helpers for tests of the app: its config composed as the app composes it, a crash on cue."""
from __future__ import annotations

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

import sparsecomm.train  # noqa: F401  registers the sc_run_id resolver


def compose_app(*overrides: str) -> DictConfig:
    """``conf/train.yaml`` with ``overrides``; Hydra's global state is left clear."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="sparsecomm.conf", version_base="1.3"):
            return compose("train", overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


class Crash(Exception):
    """Raised by a trainer armed with :func:`crash_before`."""


def crash_before(trainer, step: int) -> None:
    """Make ``trainer`` raise :class:`Crash` when it is about to train ``step`` (a killed job)."""
    real_step = trainer.train_step

    def train_step(s):
        if s == step:
            raise Crash
        return real_step(s)
    trainer.train_step = train_step
