"""sparsecomm.app.metrics: rank 0's JSONL/progress logger, the no-op logger elsewhere, wandb checks."""
from __future__ import annotations

import io
import json
import sys

import pytest
from omegaconf import OmegaConf

from sparsecomm.app import config, metrics


def test_jsonl_records(tmp_path):
    log = metrics.MetricsLogger(str(tmp_path), total_steps=4, progress=True, stream=io.StringIO())
    log.log("train", 2, loss=0.5, bytes_per_step=12.0)
    log.log("eval", 4, test_acc=float("nan"))
    log.progress(4, loss="0.5")
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["event"], r["step"]) for r in rows] == [("train", 2), ("eval", 4)]
    assert rows[0]["loss"] == 0.5 and rows[1]["test_acc"] == "nan"  # valid JSON, no NaN literal


def test_other_ranks_get_a_null_logger(monkeypatch, tmp_path):
    monkeypatch.setattr(metrics.sdist, "is_main_process", lambda: False)
    cfg = OmegaConf.create({"progress": True, "jsonl": True, "wandb": {"mode": "offline"}})
    log = metrics.make_logger(cfg, str(tmp_path), total_steps=3)
    assert type(log) is metrics.NullLogger
    log.log("train", 1, loss=1.0)
    log.close()
    assert list(tmp_path.iterdir()) == []


def test_missing_wandb_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError, installed or not
    with pytest.raises(config.ConfigError, match=r"pip install 'sparsecomm\[wandb\]'") as info:
        config.check_wandb(OmegaConf.create({"wandb": {"mode": "offline"}}))
    assert "\n" not in str(info.value)


def test_wandb_mode_is_checked():
    with pytest.raises(config.ConfigError, match=r"logging\.wandb\.mode='sometimes'"):
        config.check_wandb(OmegaConf.create({"wandb": {"mode": "sometimes"}}))
    config.check_wandb(OmegaConf.create({"wandb": None}))  # off: nothing to check


def test_human_bytes():
    assert metrics.human_bytes(512) == "512 B" and metrics.human_bytes(1.5e6) == "1.50 MB"
