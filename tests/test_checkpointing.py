"""The app's checkpoints (sparsecomm/app/checkpointing.py): the manager on its own, then the trainer's resume.

The manager is tested on 2-3 forked Gloo ranks with components it knows nothing about; what a
file holds is read back with an independent reader of the format (magic line, SHA-256 line,
``torch.load`` of the rest), not with the library's decoder. The trainer's resume is compared
with an uninterrupted run of the same config (a "crash" is an exception raised on every rank
before a step; the real SIGKILL under torchrun is in tests/test_elastic.py).
"""
from __future__ import annotations

import hashlib
import io
import os

import pytest
import torch
from multirank import run_ranks
from trainrun import assert_same_params, compose_cfg, records, train, untimed

from sparsecomm.app import config
from sparsecomm.app.checkpointing import CheckpointError, CheckpointManager, TrainingHeader
from sparsecomm.checkpoint import encode

REFRESH = ["mask.num_samples=32", "mask.density=0.2", "schedule=refresh", "schedule.dense_steps=2", "schedule.refresh_every=5", "steps=14",
           "checkpoint.every=4"]


def read_file(path):
    """The payload of a checkpoint file, read without the library: magic, hex SHA-256, then torch.save's bytes."""
    data = open(path, "rb").read()
    magic, digest, body = data.split(b"\n", 2)
    assert magic == b"SPARSECOMM-CKPT-1" and hashlib.sha256(body).hexdigest() == digest.decode()
    return torch.load(io.BytesIO(body), weights_only=True)


class Counter:
    """A component: a tensor that differs per rank, and the order in which components load."""

    def __init__(self, name, value, loaded):
        self.name, self.value, self.loaded = name, value, loaded

    def state_dict(self):
        return {"value": self.value.clone()}

    def load_state_dict(self, sd):
        if not torch.isfinite(sd["value"]).all():
            raise ValueError(f"{self.name} holds NaN")
        self.value = sd["value"].clone()
        self.loaded.append(self.name)


def manager(directory, loaded, rank, *, resume="auto", keep=2, validate=None, **fields):
    cfg = {"every": 2, "keep": keep, "dir": directory, "resume": resume}
    states = {n: Counter(n, torch.full((2,), float(10 * rank + i)), loaded) for i, n in enumerate(("b", "a", "c"))}
    return CheckpointManager(cfg, "/nonexistent-run-dir", states=states, header=lambda: {"model": "m", **fields},
                             validate=validate or (lambda header, source: loaded.append("validate")),
                             prepare=lambda header: loaded.append(f"prepare {header['step']}"))


def _save_then_resume(rank, world, directory):
    loaded = []
    m = manager(directory, loaded, rank)
    m.check_writable()
    paths = [m.save(step) for step in (2, 4, 6)]
    assert m.written_at(6) and not m.written_at(4)
    fresh = manager(directory, loaded, rank=5)  # other values: the load must bring back rank 0's
    step, path, header = fresh.resume()
    return {"paths": paths, "step": step, "path": path, "header": header, "loaded": loaded,
            "values": {n: c.value.tolist() for n, c in fresh.states.items()}}


def test_rank_0_writes_one_file_per_step_and_resume_loads_it_in_order(tmp_path):
    d = str(tmp_path / "ck")
    r0, r1 = run_ranks(_save_then_resume, 2, d, timeout=120)
    newest = os.path.join(d, "step-00000006.ckpt")
    assert r0["paths"][-1] == newest and r1["paths"] == [None, None, None]  # rank 0 alone writes
    assert sorted(os.listdir(d)) == ["step-00000004.ckpt", "step-00000006.ckpt"]  # keep=2
    sd = read_file(newest)
    assert {k: v for k, v in sd.items() if k != "state"} == {"format": 2, "step": 6, "world_size": 2, "model": "m"}
    assert list(sd["state"]) == ["b", "a", "c"] and sd["state"]["a"]["value"].tolist() == [1.0, 1.0]
    for r in (r0, r1):
        assert (r["step"], r["path"]) == (6, newest)
        assert r["header"]["components"] == ["b", "a", "c"] and r["header"]["world_size"] == 2
        assert r["loaded"] == ["prepare 6", "validate", "b", "a", "c"]  # prepare, validate, then registration order
        assert r["values"] == {"b": [0.0, 0.0], "a": [1.0, 1.0], "c": [2.0, 2.0]}


def _resume_error(rank, world, directory, resume, validate):
    loaded = []
    try:
        manager(directory, loaded, rank, resume=resume, validate=validate).resume()
    except CheckpointError as e:
        return str(e), loaded
    return None, loaded


def _write(path, payload):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(encode(payload))


def _refuse(header, source):
    raise CheckpointError(f"{source} is not for this run")


@pytest.mark.slow  # 2-rank runs over damaged checkpoints: 4 s
def test_unusable_checkpoints_are_one_line_on_every_rank_and_load_nothing(tmp_path):
    good = {"format": 2, "step": 4, "world_size": 2, "model": "m", "state": {"a": {"value": torch.zeros(2)}}}
    cases = {  # name: (payload, the message's end, what was prepared, validated and loaded before it)
        "format": ({**good, "format": 1}, "has format 1, not 2", []),
        "field": ({k: v for k, v in good.items() if k != "model"}, "lacks its 'model' field", []),
        "not a dict": ([1, 2], "has format 'list', not 2", []),
        "component": ({**good, "state": {"a": {"value": torch.full((2,), float("nan"))}}},
                      ": a holds NaN; start a new run", ["prepare 4", "validate"]),
    }
    for name, (payload, expected, before) in cases.items():
        path = str(tmp_path / name / "step-00000004.ckpt")
        _write(path, payload)
        for message, loaded in run_ranks(_resume_error, 2, str(tmp_path / name), "auto", None, timeout=120):
            assert message is not None and message.startswith(path) and expected in message, (name, message)
            assert "\n" not in message and loaded == before, (name, loaded)
    _write(str(tmp_path / "ok" / "step-00000004.ckpt"), good)
    for message, loaded in run_ranks(_resume_error, 2, str(tmp_path / "ok"), "auto", _refuse, timeout=120):
        assert message.endswith("step-00000004.ckpt is not for this run") and loaded == ["prepare 4"]


def test_the_resume_policy(tmp_path):
    d = str(tmp_path / "ck")
    _write(os.path.join(d, "step-00000004.ckpt"), {"format": 2, "step": 4, "world_size": 1, "model": "m", "state": {}})
    (never,) = run_ranks(_resume_error, 1, d, "never", None, timeout=60)
    assert "checkpoint.resume=never would mix two runs" in never[0]
    (empty,) = run_ranks(_resume_error, 1, str(tmp_path / "empty"), "never", None, timeout=60)
    assert empty == (None, [])  # nothing there: a fresh start
    (missing,) = run_ranks(_resume_error, 1, str(tmp_path / "x"), str(tmp_path / "nope.ckpt"), None, timeout=60)
    assert missing[0].startswith(f"checkpoint.resume='{tmp_path / 'nope.ckpt'}' cannot be used")
    (folder,) = run_ranks(_resume_error, 1, str(tmp_path / "y"), str(tmp_path), None, timeout=60)
    assert "holds no checkpoint that verifies" in folder[0]
    (other,) = run_ranks(_resume_error, 1, str(tmp_path / "z"), d, None, timeout=60)
    assert other == (None, ["prepare 4", "validate"])  # another run's folder: its newest file, loaded


def test_training_header_names_the_first_difference():
    cfg = compose_cfg("steps=4")
    model = torch.nn.Linear(3, 2)
    header = TrainingHeader(cfg, config.config_hash(cfg), lambda: model)
    mine = header()
    assert mine["model_signature"] == {"weight": [2, 3], "bias": [2]}
    header.validate(mine, "x.ckpt")  # its own header passes
    with pytest.raises(CheckpointError, match=r"^x.ckpt is a checkpoint of another model: 'weight' has shape \(2, 4\)"):
        header.validate({**mine, "model_signature": {"weight": [2, 4], "bias": [2]}}, "x.ckpt")
    other = compose_cfg("steps=4", "optim.lr=0.5")
    with pytest.raises(CheckpointError, match=r"written with another config: optim.lr=0\.5 \(checkpoint\) vs"):
        header.validate({**mine, "config": config.training_config(other), "config_hash": "x"}, "x.ckpt")


def test_an_unwritable_checkpoint_dir_is_refused_at_start(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    m = CheckpointManager({"every": 2, "keep": 1, "dir": str(blocker / "ck"), "resume": "auto"}, str(tmp_path))
    with pytest.raises(CheckpointError, match=r"^checkpoint.dir='.*' is not writable .*checkpoint.every=0$"):
        m.check_writable()
    CheckpointManager({"every": 0, "keep": 1, "dir": str(blocker / "ck"), "resume": "auto"}, str(tmp_path)).check_writable()


# --- the trainer's resume ----------------------------------------------------------------------

@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path):
    cfg = compose_cfg(*REFRESH)
    full_dir, cut_dir = str(tmp_path / "full"), str(tmp_path / "cut")
    full = run_ranks(train, 2, cfg, full_dir, timeout=120)
    # Crash before step 11: checkpoints at 4 and 8 exist, steps 8..10 are lost and recomputed.
    assert run_ranks(train, 2, cfg, cut_dir, 11, timeout=120) == [{"crashed": True}] * 2
    assert sorted(os.listdir(os.path.join(cut_dir, "checkpoints"))) == ["step-00000004.ckpt", "step-00000008.ckpt"]
    resumed = run_ranks(train, 2, cfg, cut_dir, timeout=120)

    for r in range(2):
        assert_same_params(full[r]["params"], resumed[r]["params"])
        assert full[r]["digest"] == resumed[r]["digest"]
    s_full, s_res = full[0]["summary"], resumed[0]["summary"]
    assert s_res["resumed_from"].endswith("step-00000008.ckpt")
    for key in ("bytes_sent", "dense_bytes", "mask_score_bytes", "test_acc", "test_loss", "k", "mask_digest"):
        assert s_full[key] == s_res[key], key

    recs = records(cut_dir)
    (i,) = [j for j, r in enumerate(recs) if r["event"] == "resume"]
    assert recs[i]["step"] == 8 and recs[i]["resharded"] is False
    after = [untimed(r) for r in recs[i + 1:] if r["event"] not in ("summary",)]
    expected = [untimed(r) for r in records(full_dir) if r["step"] > 8 and r["event"] != "summary"]
    assert [r["event"] for r in after] == [r["event"] for r in expected]
    assert after == expected  # train loss (window across the checkpoint), eval, mask refresh at 12, bytes


def test_resume_with_another_world_size_says_so(tmp_path):
    cfg = compose_cfg(*REFRESH)
    two = str(tmp_path / "two")
    assert run_ranks(train, 2, cfg, two, 11, timeout=120) == [{"crashed": True}] * 2
    one = str(tmp_path / "one")
    cfg1 = compose_cfg(*REFRESH, f"checkpoint.resume={two}/checkpoints")
    (res,) = run_ranks(train, 1, cfg1, one, timeout=120)
    assert res["summary"]["world_size"] == 1 and res["summary"]["resumed_from"].endswith("step-00000008.ckpt")
    (ev,) = [r for r in records(one) if r["event"] == "resume"]
    assert ev["resharded"] is True and ev["saved_world_size"] == 2 and ev["world_size"] == 1
    assert [r["step"] for r in records(one) if r["event"] == "train"] == [9, 12, 14]


def _checkpointed(tmp_path, *overrides):
    cfg = compose_cfg("schedule=fish_fixed", "mask=random", "mask.density=0.2", "steps=6", "checkpoint.every=2", *overrides)
    run_dir = str(tmp_path / "run")
    run_ranks(train, 1, cfg, run_dir, timeout=120)
    return cfg, run_dir, os.path.join(run_dir, "checkpoints")


@pytest.mark.slow
def test_corrupted_checkpoint_falls_back_loudly_then_errors(tmp_path, capfd):
    cfg, run_dir, ck = _checkpointed(tmp_path)
    assert sorted(os.listdir(ck)) == ["step-00000002.ckpt", "step-00000004.ckpt", "step-00000006.ckpt"]
    newest = os.path.join(ck, "step-00000006.ckpt")
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    (res,) = run_ranks(train, 1, cfg, run_dir, timeout=120)
    assert res["summary"]["resumed_from"].endswith("step-00000004.ckpt")
    err = capfd.readouterr().err
    skipped = [line for line in err.splitlines() if line.startswith("sparsecomm: skipping checkpoint")]
    # one loud line naming the damaged file (not the one it fell back to), as the run printed it
    assert len(skipped) == 1, err[-3000:]
    assert skipped[0].startswith(f"sparsecomm: skipping checkpoint {newest}: ") and "falling back" in skipped[0]
    assert "step-00000004.ckpt" not in skipped[0]
    for name in os.listdir(ck):  # now damage every one
        with open(os.path.join(ck, name), "r+b") as f:
            f.seek(-5, 2)
            f.write(b"XXXXX")
    (res,) = run_ranks(train, 1, cfg, run_dir, timeout=120)
    # The fix it suggests is safe to follow: a new run in a fresh folder (not resume=never).
    assert res["error"].startswith("CheckpointError: no checkpoint in") and "another run_id" in res["error"]
    (res,) = run_ranks(train, 1, compose_cfg("schedule=fish_fixed", "mask=random", "mask.density=0.2", "steps=6",
                                             f"checkpoint.resume={newest}"), str(tmp_path / "x"), timeout=120)
    assert res["error"].startswith("CheckpointError: checkpoint.resume=") and "truncated or corrupted" in res["error"]


@pytest.mark.slow
def test_checkpoint_of_another_model_or_config_is_refused(tmp_path):
    _, _, ck = _checkpointed(tmp_path)
    other = compose_cfg("schedule=fish_fixed", "mask=random", "mask.density=0.2", "steps=6", "task.hidden=16", f"checkpoint.resume={ck}")
    (res,) = run_ranks(train, 1, other, str(tmp_path / "o"), timeout=120)
    assert "is a checkpoint of another model" in res["error"] and "another run_id" in res["error"]
    assert "\n" not in res["error"]
    lr = compose_cfg("schedule=fish_fixed", "mask=random", "mask.density=0.2", "steps=6", "optim.lr=0.5", f"checkpoint.resume={ck}")
    (res,) = run_ranks(train, 1, lr, str(tmp_path / "l"), timeout=120)
    assert "was written with another config: optim.lr=" in res["error"]


def test_leftover_temporary_files_of_a_killed_write_are_removed(tmp_path):
    cfg, run_dir, ck = _checkpointed(tmp_path)
    leftover = os.path.join(ck, ".tmp-abc123step-00000008.ckpt")
    with open(leftover, "wb") as f:
        f.write(b"half a checkpoint")
    (res,) = run_ranks(train, 1, cfg, run_dir, timeout=120)
    assert res["summary"]["resumed_from"].endswith("step-00000006.ckpt") and not os.path.exists(leftover)


@pytest.mark.parametrize("override,field", [
    ("checkpoint.every=-1", "checkpoint.every"),
    ("checkpoint.keep=0", "checkpoint.keep"),
    ("checkpoint.every=often", "checkpoint.every"),
    ("checkpoint.resume=/no/such/ckpt", "checkpoint.resume"),
])
def test_checkpoint_config_errors_name_the_field(override, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        config.check_config(compose_cfg(*override.split()))
