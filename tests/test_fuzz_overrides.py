"""Random overrides fed to the app (``sparsecomm.train.main``, in this process, one rank): every case
either trains or ends in ONE line ``error: ...`` naming a field, exit code 2; never a traceback.

Also the bad files of issue 6, through the app: a mask file for another model, a corrupted
checkpoint, a checkpoint of another model.
"""
from __future__ import annotations

import os
import random
import re

import pytest
from hydra.core.global_hydra import GlobalHydra

from sparsecomm import train

# Invalid and valid values of many fields; a case draws 1 to 3, each bad with probability 0.4.
BAD = [
    "mask.density=0", "mask.density=1.5", "mask.density=abc", "mask=nope", "mask=file", "mask.method=fancy",
    "task=cifar10", "task=glue", "task.data_dir=/no/such/dir", "steps=-3", "steps=abc", "batch_size=0",
    "batch_size=x", "cluster.backend=nccl", "cluster.device=tpu", "comm.wire_dtype=fp8", "optim=adam", "optim.lr=0",
    "optim.lr=fast", "schedule=nope", "schedule.dense_steps=-1", "schedule.core_full=2-1", "schedule.lr.name=step",
    "checkpoint.every=-2", "checkpoint.keep=0", "checkpoint.resume=/no/such.ckpt", "nonfinite.max_in_a_row=0",
    "eval_every=-1", "logging.wandb.mode=loud", "cluster.start_method=teleport",
]
GOOD = [
    "mask.density=0.05", "mask=random", "mask=dense", "steps=6", "comm.wire_dtype=bf16", "comm.fused=false",
    "optim=sgd", "schedule=fish_fixed", "schedule.core_full=1:1", "schedule/lr=linear", "checkpoint.every=2",
    "checkpoint.keep=1", "nonfinite.max_in_a_row=1", "eval_every=2", "seed=3",
]
BASE = ["cluster.nproc_per_node=1", "steps=4", "schedule.dense_steps=1", "batch_size=8", "eval_every=0",
        "eval_batch_size=128", "logging.progress=false", "++mask.num_samples=16"]


def cases(n=16, seed=6):
    rng = random.Random(seed)
    return [[rng.choice(BAD if rng.random() < 0.4 else GOOD) for _ in range(rng.randint(1, 3))] for _ in range(n)]


def key_of(override: str) -> str:
    return override.lstrip("+").split("=", 1)[0]


def run_app(args, capsys) -> tuple[int, str, str]:
    GlobalHydra.instance().clear()
    try:
        train.main(args)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        GlobalHydra.instance().clear()
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_runs_or_one_line_error(code, out, err, keys):
    assert "Traceback" not in out + err, err
    if code == 0:
        assert "== sparsecomm summary" in out
        return
    assert code == 2, (code, err)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    line = errors[0]
    named = [k for k in keys if k in line]
    assert named or re.search(r"[a-z_]+\.[a-z_.]+=", line), f"names no field: {line}"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID", "SLURM_PROCID", "SPARSECOMM_TRACEBACK"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("case", cases(), ids=lambda c: " ".join(c))
def test_random_overrides_run_or_fail_in_one_line(case, tmp_path, capsys):
    args = [*BASE, *case, f"out_dir={tmp_path}", "run_id=fuzz"]
    code, out, err = run_app(args, capsys)
    assert_runs_or_one_line_error(code, out, err, [key_of(o) for o in case] + [key_of(o) for o in BASE])


def test_the_random_cases_include_both_outcomes():
    """The seeded list is not all errors nor all runs (checked against the pool, not by running)."""
    drawn = cases()
    assert sum(bool(set(c) & set(BAD)) for c in drawn) >= 5 and sum(not set(c) & set(BAD) for c in drawn) >= 5


@pytest.fixture(scope="module")
def synthetic_checkpoint(tmp_path_factory):
    """A real checkpoint of a small MLP run (not the digits CNN), written through the app."""
    d = tmp_path_factory.mktemp("ck")
    try:
        GlobalHydra.instance().clear()
        train.main([*BASE, "task=synthetic", "task.in_features=16", "task.hidden=16", "task.depth=1",
                    "task.num_train=64", "task.num_test=16", "mask=random", "mask.density=0.5", "checkpoint.every=2",
                    f"out_dir={d}", "run_id=syn"])
    finally:
        GlobalHydra.instance().clear()
    return d / "syn" / "checkpoints" / "step-00000004.ckpt"


@pytest.mark.parametrize("kind", ["mask_for_another_model", "corrupted_checkpoint", "checkpoint_of_another_model"])
def test_bad_files_end_in_one_line(kind, tmp_path, capsys, synthetic_checkpoint):
    capsys.readouterr()
    if kind == "mask_for_another_model":
        from sparsecomm import models, random_mask

        path = tmp_path / "mask.safetensors"
        random_mask(models.mlp(16, 16, 1, 10), density=0.5).save(path)
        extra, field, why = ["mask=file", f"mask.path={path}"], "mask.path", "another model"
    elif kind == "corrupted_checkpoint":
        path = tmp_path / "step-00000004.ckpt"
        data = bytearray(synthetic_checkpoint.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        extra, field, why = [f"checkpoint.resume={path}"], "checkpoint.resume", "truncated or corrupted"
    else:
        extra, field, why = [f"checkpoint.resume={synthetic_checkpoint}"], "checkpoint.resume", "another model"
    code, out, err = run_app([*BASE, *extra, f"out_dir={tmp_path}", "run_id=bad"], capsys)
    assert code == 2 and "Traceback" not in out + err, err
    (line,) = [l for l in err.splitlines() if l.startswith("error: ")]
    assert field in line and why in line, line
    assert os.path.exists(synthetic_checkpoint)
