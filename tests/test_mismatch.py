"""Never training on disagreement: ranks started with different configs, a mask file of another model.

(Checkpoints of another model or config: tests/test_checkpointing.py.)
"""
from __future__ import annotations

import pytest
import torch
from multirank import run_ranks
from trainrun import compose_cfg, train

from sparsecomm.app import config, trainer


@pytest.mark.slow
def test_mask_file_for_another_model_names_mask_path(tmp_path):
    from sparsecomm import random_mask
    from sparsecomm.app import models

    path = str(tmp_path / "mask.safetensors")
    random_mask(models.mlp(32, 16, 2, 10), density=0.2).save(path)
    cfg = compose_cfg("mask=file", f"mask.path={path}", "schedule=fish_fixed", "steps=2")
    config.check_config(cfg)  # the file exists; the model does not fit it
    (res,) = run_ranks(train, 1, cfg, str(tmp_path / "r"), timeout=120)
    assert res["error"].startswith(f"ConfigError: mask.path='{path}': ") and "another model" in res["error"]
    # a mask for this model trains
    good = str(tmp_path / "good.safetensors")
    random_mask(models.mlp(32, 32, 2, 10), density=0.2).save(good)
    (res,) = run_ranks(train, 1, compose_cfg("mask=file", f"mask.path={good}", "schedule=fish_fixed", "steps=2"),
                       str(tmp_path / "g"), timeout=120)
    assert res["summary"]["mask"] == "file"


@pytest.mark.parametrize("override,field", [
    ("mask=file", "mask.path"),
    ("mask=file mask.path=/no/such.safetensors", "mask.path"),
])
def test_mask_file_config_errors_name_the_field(override, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        config.check_config(compose_cfg(*override.split()))


def _start(rank, world, cfgs, run_dir):
    try:
        trainer.Trainer(cfgs[rank], run_dir, torch.device("cpu")).close()
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return "started"


def test_ranks_with_different_configs_stop_listing_each_hash(tmp_path):
    cfgs = [compose_cfg("mask=random", "steps=4"), compose_cfg("mask=random", "steps=4", "optim.lr=0.5")]
    hashes = [config.config_hash(c) for c in cfgs]
    for msg in run_ranks(_start, 2, cfgs, str(tmp_path), timeout=120):
        assert msg.startswith("RankDisagreement: ranks disagree on the config hash")
        assert f"rank 0: {hashes[0]}" in msg and f"rank 1: {hashes[1]}" in msg
