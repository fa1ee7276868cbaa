"""Every failed write names its file (sparsecomm/app/writes.py), on a real full disk: a small tmpfs
filled to the last byte just before each write point, and a file system remounted read-only.

Each case checks: exit code 2, ONE ``error:`` line naming the file and the reason, no traceback,
no partial file or line left, and a hint the next command keeps (after freeing the space, the
command it names does what it says: resumes, or is refused for a new run_id).
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from apptest import TINY, clean_launcher_env, error_lines, main_in_process, read_events, tmpfs

pytestmark = pytest.mark.slow  # an app run per write point on a full tmpfs

ARGS = [*TINY, "steps=6", "checkpoint.every=2", "logging.log_every=1"]


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    clean_launcher_env(monkeypatch)


@pytest.fixture
def disk(tmp_path):
    """A 16 MB tmpfs at ``tmp_path/disk`` (needs root)."""
    with tmpfs(tmp_path / "disk", "size=16m") as mount:
        yield mount


def fill(mount: Path) -> None:
    """Fill the file system of ``mount`` to the last byte (``mount/filler``)."""
    with open(mount / "filler", "ab", buffering=0) as f:
        for chunk in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC


def first_call_of(module, name: str, before, when=lambda *a, **k: True) -> None:
    """Run ``before()`` once, just before the first call of ``module.name`` that ``when`` accepts."""
    real = getattr(module, name)
    armed = [True]

    def wrapped(*args, **kwargs):
        if armed[0] and when(*args, **kwargs):
            armed[0] = False
            before()
        return real(*args, **kwargs)
    setattr(module, name, wrapped)


def write_point(monkeypatch, point: str, before) -> None:
    from sparsecomm import checkpoint, diff, mask
    from sparsecomm.app import metrics, report, trainer, writes

    def patch(module, name, when=lambda *a, **k: True):
        monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
        first_call_of(module, name, before, when)

    # A file's first write (a tmpfs append that fits in the file's last page needs no new space)
    if point == ".hydra":  # Hydra's record, written before the app runs: the disk is full from the start
        before()
    elif point == "metrics.jsonl":
        patch(metrics.MetricsLogger, "log")
    elif point == "log.txt":
        patch(metrics.MetricsLogger, "write_log")
    elif point == "config.yaml":
        patch(trainer, "write_config")
    elif point == "mask.safetensors":
        patch(mask.Mask, "save")
    elif point == "step-00000004.ckpt":
        patch(checkpoint, "write_atomic", lambda path, data: path.endswith("step-00000004.ckpt"))
    elif point == "task_diff.safetensors":
        patch(diff, "save")
    elif point in ("base.safetensors", "model.safetensors"):
        patch(writes, "save_model_atomic", lambda model, path: path.endswith(point))
    elif point == "summary.json":
        patch(report, "write_atomic")
    else:
        raise AssertionError(point)


POINTS = [".hydra", "metrics.jsonl", "log.txt", "config.yaml", "mask.safetensors", "step-00000004.ckpt",
          "task_diff.safetensors", "base.safetensors", "model.safetensors", "summary.json"]


def check_failure(err: str, run_dir: Path, point: str, reason: str) -> str:
    assert "Traceback" not in err and "SafetensorError" not in err, err
    (line,) = error_lines(err)
    assert point in line and str(run_dir) in line and reason in line and "free there" in line, line
    leftovers = [p.name for p in run_dir.rglob("*") if ".tmp" in p.name]
    assert not leftovers, leftovers
    if (run_dir / "metrics.jsonl").exists():
        for text in (run_dir / "metrics.jsonl").read_text().splitlines():
            json.loads(text)  # no partial line
    return line


def follow_the_hint(err: str, args: list[str], capsys, run_dir: Path) -> None:
    """The command the hint names does what the hint says."""
    code, _, err2 = main_in_process(args, capsys)
    if "resume with: " in err:
        assert code == 0 and "resumed from" in err2, err2
        steps = [r["step"] for r in read_events(run_dir) if r["event"] == "train"]
        assert steps == list(range(1, 7))
    elif "another run_id" in err:
        assert code == 2 and "run_id=" in error_lines(err2)[0], err2
    else:  # nothing was left to resume: the folder went, the same command starts afresh
        assert code == 0, err2


@pytest.mark.parametrize("point", POINTS)
def test_a_full_disk_at_each_write_is_one_line_naming_the_file(disk, capsys, monkeypatch, point):
    write_point(monkeypatch, point, lambda: fill(disk))
    args = [*ARGS, f"out_dir={disk}", "run_id=w"]
    code, _, err = main_in_process(args, capsys)
    assert code == 2, err
    line = check_failure(err, disk / "w", point, "No space left on device")
    if point.endswith((".safetensors", ".json", ".yaml", ".ckpt")) and point != "task_diff.safetensors":
        assert "needed" in line, line  # the size is known before the write
    monkeypatch.undo()
    clean_launcher_env(monkeypatch)
    (disk / "filler").unlink()
    follow_the_hint(err, args, capsys, disk / "w")


@pytest.mark.parametrize("point", ["metrics.jsonl", "model.safetensors"])
def test_a_run_folder_turned_read_only_is_one_line_naming_the_file(disk, capsys, monkeypatch, point):
    run_dir = disk / "ro"

    def read_only():  # a read-only bind mount over the run folder (files already open stay writable)
        subprocess.run(["mount", "--bind", str(run_dir), str(run_dir)], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(run_dir)], check=True)
    write_point(monkeypatch, point, read_only)
    args = [*ARGS, f"out_dir={disk}", "run_id=ro"]
    try:
        code, _, err = main_in_process(args, capsys)
    finally:
        subprocess.run(["umount", str(run_dir)], check=False)
    assert code == 2, err
    check_failure(err, run_dir, point, "Read-only file system")
    monkeypatch.undo()
    clean_launcher_env(monkeypatch)
    follow_the_hint(err, args, capsys, run_dir)


def test_a_folder_where_the_model_file_goes_is_one_line(tmp_path, capsys, monkeypatch):
    write_point(monkeypatch, "model.safetensors", lambda: os.mkdir(tmp_path / "m" / "model.safetensors"))
    code, _, err = main_in_process([*ARGS, f"out_dir={tmp_path}", "run_id=m"], capsys)
    assert code == 2, err
    check_failure(err, tmp_path / "m", "model.safetensors", "directory")
