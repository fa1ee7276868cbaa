"""Mask kinds read a View and return a Change; the trainer applies it (2 Gloo ranks).

A test kind asks for a dense step, a log record and a line, and a summary field; the bytes the
run reports are checked against n x 4 / k x 4 per step counted here from the model and the mask
file, the record and line against metrics.jsonl and log.txt. The structure checks read the
kinds' source: no kind takes the trainer or imports it.
"""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import torch
from apptest import compose_app, read_events
from multirank import run_ranks

from sparsecomm import Mask
from sparsecomm.app import masks, trainer
from sparsecomm.app.masks.base import Change, MaskKind
from sparsecomm.app.masks.random import RandomKind

TINY = ["task=synthetic", "task.in_features=32", "task.hidden=32", "task.depth=2", "task.num_train=256",
        "task.num_test=64", "batch_size=8", "eval_every=0", "logging.progress=false", "save_model=false",
        "cluster.num_threads=1", "schedule=fish_fixed", "mask=random", "mask.density=0.3", "steps=5"]
MASKS = Path(masks.__file__).parent


class DenseAtStepTwo(RandomKind):
    """A random mask; step 2 sends dense gradients; says so in the log, metrics and the summary."""

    def before_step(self, view):
        if view.step == 2:
            return Change(dense=True, records=[("probe", {"bytes_before": view.bytes_sent})],
                          lines=[f"step {view.step}: the probe kind asks for a dense step"])
        return None

    def outputs(self, view):
        return Change(fields={"probe_final_bytes": view.bytes_sent})


def _fit(rank, world, cfg, run_dir, random_kind=None):
    if random_kind is not None:
        masks.MASK_KINDS["random"] = random_kind  # this forked rank only
    t = trainer.Trainer(cfg, run_dir, torch.device("cpu"))
    try:
        return {"summary": t.fit(), "n": sum(p.numel() for p in t.model.parameters())}
    finally:
        t.close()


def test_the_trainer_applies_a_kind_s_change(tmp_path):
    r0, r1 = run_ranks(_fit, 2, compose_app(*TINY), str(tmp_path), DenseAtStepTwo, timeout=120)
    k, n = Mask.load(tmp_path / "mask.safetensors").num_selected, r0["n"]
    expected = 4 * k * 4 + n * 4  # 4 masked steps, 1 dense
    for r in (r0, r1):
        s = r["summary"]
        assert s["bytes_sent"] == expected and s["probe_final_bytes"] == expected and s["dense_bytes"] == 5 * n * 4
    probe = [e for e in read_events(tmp_path) if e["event"] == "probe"]
    assert [(e["step"], e["bytes_before"]) for e in probe] == [(2, 2 * k * 4)]
    assert "step 2: the probe kind asks for a dense step" in (tmp_path / "log.txt").read_text()


def _kind_classes():
    for name in masks.MASK_KINDS:
        yield masks.MASK_KINDS[name]
    yield MaskKind


def test_no_kind_point_takes_the_trainer():
    for cls in _kind_classes():
        for name, fn in inspect.getmembers(cls, inspect.isfunction):
            params = set(inspect.signature(fn).parameters)
            assert not params & {"run", "trainer"}, f"{cls.__name__}.{name} takes {params & {'run', 'trainer'}}"


def test_kinds_import_neither_the_trainer_nor_its_state():
    banned = {"trainer", "train_state", "changes", "callbacks"}
    for path in MASKS.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert node.module.split(".")[-1] not in banned, f"{path.name} imports {node.module}"


def test_a_comm_option_that_sends_every_entry_leaves_the_kind_unused(tmp_path):
    """comm=fp16 with mask=random: every step sends all n entries as fp16 (n x 2 bytes, counted
    here), no mask is chosen or written, the log says the kind is unused, the summary mask=unused."""
    r0, r1 = run_ranks(_fit, 2, compose_app(*TINY, "comm=fp16"), str(tmp_path), timeout=120)
    n = r0["n"]
    for r in (r0, r1):
        s = r["summary"]
        assert s["mask"] == "unused" and s["comm"] == "fp16" and s["k"] is None
        assert s["bytes_sent"] == 5 * n * 2 and s["dense_bytes"] == 5 * n * 4
    assert not (tmp_path / "mask.safetensors").exists()
    cfg = compose_app(*TINY, "comm=fp16")
    assert (f"comm=fp16: every entry trains (dense optimizer) at optim.dense_lr={cfg.optim.dense_lr:g}; "
            "mask=random and optim.lr are unused") in (tmp_path / "log.txt").read_text()
