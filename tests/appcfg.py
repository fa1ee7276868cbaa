"""The app's config for tests, composed with Hydra's compose API (as the app composes it)."""
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
