"""The library's checkpoint files (sparsecomm/checkpoint.py): atomic writes, SHA-256 verified reads, keep-K, RNG states."""

import os
import random
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from sparsecomm.checkpoint import CheckpointFolder, CheckpointManager, CorruptCheckpoint, decode, encode, rng_state, set_rng_state


def payload(i):
    return {"model": {"w": torch.full((3, 3), float(i))}, "meta": {"name": "x", "lr": 0.1}, "list": [1, 2]}


def test_roundtrip_and_keep_last_k(tmp_path):
    cm = CheckpointFolder(str(tmp_path), keep=2)
    for step in (10, 20, 30):
        cm.save(step, payload(step))
    assert cm.steps() == [20, 30]
    got = cm.load_latest()
    assert got["step"] == 30 and torch.equal(got["model"]["w"], torch.full((3, 3), 30.0))
    assert got["meta"] == {"name": "x", "lr": 0.1}
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]
    assert cm.files() == [str(tmp_path / "step-00000020.ckpt"), str(tmp_path / "step-00000030.ckpt")]
    assert CheckpointManager is CheckpointFolder  # the library's name for it in docs/library.md


def test_only_checkpoint_files_count_and_temporaries_of_killed_writes_go(tmp_path):
    for name in ("step-00000005.ckpt", "step-5.ckpt", "step-00000007.ckpt.bak", "notes.txt", ".tmp-x1step-00000009.ckpt"):
        (tmp_path / name).write_bytes(b"x")
    folder = CheckpointFolder(str(tmp_path))
    assert folder.steps() == [5] and folder.files() == [str(tmp_path / "step-00000005.ckpt")]
    folder.remove_temporaries()
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "step-00000005.ckpt", "step-00000007.ckpt.bak", "step-5.ckpt"]
    assert CheckpointFolder(str(tmp_path / "none")).files() == []


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_newest_is_skipped_loudly(tmp_path, damage, capsys):
    cm = CheckpointFolder(str(tmp_path), keep=3)
    cm.save(1, payload(1))
    path = cm.save(2, payload(2))
    data = bytearray(open(path, "rb").read())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[-10] ^= 0x55
    open(path, "wb").write(bytes(data))
    with pytest.warns(UserWarning, match="skipping checkpoint .*step-00000002.ckpt"):
        got = cm.load_latest()
    assert got["step"] == 1
    assert "truncated or corrupted" in capsys.readouterr().err


def test_decode_refuses_foreign_file():
    with pytest.raises(CorruptCheckpoint, match="not a sparsecomm checkpoint"):
        decode(b"hello world", "x.ckpt")
    data = encode(payload(0))
    assert decode(data)["list"] == [1, 2]


def test_sigkill_during_write_leaves_previous_loadable(tmp_path):
    """A real SIGKILL while a large checkpoint is being written."""
    cm = CheckpointFolder(str(tmp_path), keep=3)
    cm.save(1, payload(1))
    script = textwrap.dedent(f"""
        import os, sys, torch
        from sparsecomm import checkpoint as c
        real = os.fsync
        def slow_fsync(fd):
            print("writing", flush=True)
            import time; time.sleep(30)
        os.fsync = slow_fsync
        c.CheckpointFolder({str(tmp_path)!r}).save(2, {{"big": torch.zeros(2_000_000)}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"  # temp file written, not yet renamed
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    got = CheckpointFolder(str(tmp_path)).load_latest()
    assert got["step"] == 1


def test_rng_state_roundtrip():
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    st = decode(encode({"rng": rng_state()}))["rng"]
    a = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(st)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
