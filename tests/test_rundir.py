"""A run directory belongs to one run (sparsecomm/app/rundir.py), through the app's real entry point.

Each test here failed on the code before the fix: runs started in the same second shared a
folder; a reused run id overwrote a finished run; ``checkpoint.resume=never`` deleted the new
run's checkpoints; a refused resume rewrote ``config.yaml``; failed starts left empty folders.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from apptest import TINY, clean_launcher_env, crash_before, error_lines, main_in_process, read_events, tmpfs
from sparsecomm.app import rundir
from sparsecomm.checkpoint import CheckpointManager


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    clean_launcher_env(monkeypatch)


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under ``folder`` (hidden ones included)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(rundir, "timestamp", lambda: "2026-01-01_00-00-00")
    accs = []
    for seed in (0, 1):
        code, out, err = main_in_process([*TINY, f"out_dir={tmp_path}", f"seed={seed}"], capsys)
        assert code == 0, err
        accs.append(out)
    dirs = sorted(p.name for p in tmp_path.iterdir())
    assert dirs == ["2026-01-01_00-00-00", "2026-01-01_00-00-00_1"]
    for name, seed in zip(dirs, (0, 1)):
        records = read_events(tmp_path / name)
        assert sum(r["event"] == "summary" for r in records) == 1  # one run's metrics, not two interleaved
        assert f"seed: {seed}" in (tmp_path / name / "config.yaml").read_text()


def test_claim_is_atomic_under_concurrent_starts(tmp_path, monkeypatch):
    """Many claims of one timestamp (as from a shell loop): every one gets a folder of its own."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(rundir, "timestamp", lambda: "ts")
    with ThreadPoolExecutor(8) as pool:
        claims = list(pool.map(lambda _: rundir.claim(str(tmp_path), None, None), range(16)))
    paths = [c.path for c in claims]
    assert len(set(paths)) == 16 and all(c.created for c in claims)
    assert sorted(os.listdir(tmp_path)) == sorted(["ts"] + [f"ts_{i}" for i in range(1, 16)])


def test_reusing_the_id_of_a_finished_run_is_refused_and_touches_nothing(tmp_path, capsys):
    code, _, err = main_in_process([*TINY, f"out_dir={tmp_path}", "run_id=x"], capsys)
    assert code == 0, err
    before = snapshot(tmp_path / "x")
    code, out, err = main_in_process([*TINY, f"out_dir={tmp_path}", "run_id=x", "mask.density=0.02"], capsys)
    assert code == 2 and "Traceback" not in err
    (line,) = error_lines(err)
    assert str(tmp_path / "x") in line and "finished run" in line and "run_id=" in line, line
    assert snapshot(tmp_path / "x") == before  # not one byte of the finished run changed (.hydra included)


def test_a_torchrun_restart_of_a_finished_job_trains_nothing(tmp_path, capsys, monkeypatch):
    """A restart after the summary (e.g. a rank died at exit) must not train the whole run again."""
    code, _, err = main_in_process([*TINY, f"out_dir={tmp_path}", "run_id=job"], capsys)
    assert code == 0, err
    before = snapshot(tmp_path / "job")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    code, out, err = main_in_process([*TINY, f"out_dir={tmp_path}", "run_id=job"], capsys)
    assert code == 0 and "== sparsecomm summary" not in out
    assert "already holds this job's finished run" in err
    assert snapshot(tmp_path / "job") == before


def test_an_unfinished_run_without_checkpoints_is_not_overwritten(tmp_path, capsys, monkeypatch):
    from sparsecomm.app import trainer

    real_fit = trainer.Trainer.fit

    def crashing_fit(self):
        crash_before(self, 3)
        return real_fit(self)

    monkeypatch.setattr(trainer.Trainer, "fit", crashing_fit)
    code, _, err = main_in_process([*TINY, f"out_dir={tmp_path}", "run_id=c", "logging.log_every=1"], capsys)
    assert code == 1 and "Crash" in err  # Hydra reports the crash (a bug: a traceback is right)
    assert "checkpoint.every=N" in err  # and the app says how to make runs resumable
    monkeypatch.setattr(trainer.Trainer, "fit", real_fit)
    before = snapshot(tmp_path / "c")
    code, _, err = main_in_process([*TINY, f"out_dir={tmp_path}", "run_id=c"], capsys)
    assert code == 2
    (line,) = error_lines(err)
    assert "unfinished run without checkpoints" in line and "run_id=" in line, line
    assert snapshot(tmp_path / "c") == before


def crashed_run_with_checkpoints(tmp_path, capsys, monkeypatch, run_id="r"):
    """A run that wrote checkpoints at steps 2 and 4 of 8, then crashed before step 5."""
    from sparsecomm.app import trainer

    real_fit = trainer.Trainer.fit

    def crashing_fit(self):
        crash_before(self, 5)
        return real_fit(self)

    monkeypatch.setattr(trainer.Trainer, "fit", crashing_fit)
    args = [*TINY, "steps=8", "checkpoint.every=2", f"out_dir={tmp_path}", f"run_id={run_id}"]
    code, _, err = main_in_process(args, capsys)
    assert code == 1 and "Crash" in err
    assert "resume with: sparsecomm-train" in err and f"run_id={run_id}" in err, err
    monkeypatch.setattr(trainer.Trainer, "fit", real_fit)
    return args


def test_resume_never_into_a_folder_with_checkpoints_is_refused_and_keeps_them(tmp_path, capsys, monkeypatch):
    args = crashed_run_with_checkpoints(tmp_path, capsys, monkeypatch)
    before = snapshot(tmp_path / "r")
    assert sorted(os.listdir(tmp_path / "r" / "checkpoints")) == ["step-00000002.ckpt", "step-00000004.ckpt"]
    code, _, err = main_in_process([*args, "checkpoint.resume=never"], capsys)
    assert code == 2
    (line,) = error_lines(err)
    assert "checkpoint.resume=never" in line and "run_id=" in line, line
    assert snapshot(tmp_path / "r") == before


def test_a_refused_resume_leaves_the_record_as_it_was(tmp_path, capsys, monkeypatch):
    args = crashed_run_with_checkpoints(tmp_path, capsys, monkeypatch)
    before = snapshot(tmp_path / "r")
    code, _, err = main_in_process([*args, "mask.density=0.02"], capsys)
    assert code == 2
    (line,) = error_lines(err)
    assert "mask.density" in line and "another config" in line, line
    assert snapshot(tmp_path / "r") == before  # config.yaml and .hydra/ untouched


def test_the_same_command_resumes_a_crashed_run(tmp_path, capsys, monkeypatch):
    args = crashed_run_with_checkpoints(tmp_path, capsys, monkeypatch)
    code, out, err = main_in_process(args, capsys)
    assert code == 0, err
    assert "resumed from" in err and "step-00000004.ckpt" in err
    assert sorted(os.listdir(tmp_path / "r" / "checkpoints")) == [
        "step-00000004.ckpt", "step-00000006.ckpt", "step-00000008.ckpt"]


def test_keep_k_never_deletes_another_runs_checkpoints(tmp_path):
    foreign = CheckpointManager(str(tmp_path), keep=3)
    for step in (100, 200, 300):
        foreign.save(step, {"w": torch.zeros(1)})
    mine = CheckpointManager(str(tmp_path), keep=2)
    for step in (10, 20, 30):
        mine.save(step, {"w": torch.ones(1)})
    assert mine.steps() == [20, 30, 100, 200, 300]  # its own oldest went; the other run's all stay
    resumed = CheckpointManager(str(tmp_path), keep=2)
    resumed.adopt()  # resuming the folder's run makes its files this run's
    resumed.save(400, {"w": torch.ones(1)})
    assert resumed.steps() == [300, 400]


def test_failed_starts_leave_no_empty_run_directories(tmp_path, capsys):
    missing = tmp_path / "no-such-data"
    code, _, err = main_in_process([*TINY, "task=cifar10", f"task.data_dir={missing}", f"out_dir={tmp_path / 'o'}"],
                                   capsys)
    assert code == 2 and len(error_lines(err)) == 1
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


@pytest.mark.parametrize("kind", ["proc", "file"])
def test_an_unusable_out_dir_is_one_line(tmp_path, capsys, kind):
    target = "/proc/sparsecomm-test" if kind == "proc" else str(tmp_path / "a-file")
    if kind == "file":
        Path(target).write_text("x")
    code, _, err = main_in_process([*TINY, f"out_dir={target}"], capsys)
    assert code == 2 and "Traceback" not in err
    (line,) = error_lines(err)
    assert "out_dir" in line and target in line, line


def test_a_read_only_file_system_is_one_line(tmp_path, capsys):
    """A read-only mount (root ignores permission bits, so a real one): out_dir and checkpoint.dir."""
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        code, _, err = main_in_process([*TINY, f"out_dir={ro}"], capsys)
        assert code == 2 and "out_dir" in error_lines(err)[0] and len(error_lines(err)) == 1, err
        code, _, err = main_in_process([*TINY, f"out_dir={tmp_path / 'o'}", "checkpoint.every=2",
                                        f"checkpoint.dir={ro / 'ck'}"], capsys)
        assert code == 2 and len(error_lines(err)) == 1, err
        assert "checkpoint.dir" in error_lines(err)[0] and "writable" in error_lines(err)[0]


def test_a_full_disk_at_checkpoint_time_keeps_the_last_good_one(tmp_path, capsys, monkeypatch):
    """ENOSPC on the second checkpoint: one line with the path and the space, the first intact."""
    import errno

    from sparsecomm import checkpoint

    real = checkpoint.write_atomic
    calls: list[str] = []

    def full_disk(path, data):
        if path.endswith(".ckpt"):
            calls.append(path)
        if len(calls) == 2 and path.endswith(".ckpt"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real(path, data)

    monkeypatch.setattr(checkpoint, "write_atomic", full_disk)
    code, _, err = main_in_process([*TINY, "steps=8", "checkpoint.every=2", f"out_dir={tmp_path}", "run_id=d"], capsys)
    assert code == 2
    (line,) = error_lines(err)
    assert "step-00000004.ckpt" in line and "No space left" in line and "MB free" in line, line
    ckpts = tmp_path / "d" / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["step-00000002.ckpt"]
    checkpoint.verify((ckpts / "step-00000002.ckpt").read_bytes())


def test_log_txt_holds_the_runs_log_lines_and_summary(tmp_path, capsys):
    code, out, err = main_in_process([*TINY, f"out_dir={tmp_path}", "run_id=l"], capsys)
    assert code == 0
    log = (tmp_path / "l" / "log.txt").read_text()
    assert "fisher mask, k=" in log and "test accuracy" in log and "== sparsecomm summary" in log
