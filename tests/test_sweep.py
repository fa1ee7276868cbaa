"""A sweep says what happened to every job (sparsecomm/app/sweep.py): a failed job does not stop the
sweep unless ``stop_sweep_on_failure=true``; the end prints one line per job (ran, failed with its
line, not started) and the exit code is non-zero if any failed.

The reference is each job's own folder: a job reported as ran has its summary.json (and its test
accuracy), a failed or unstarted one has none.
"""
from __future__ import annotations

import json
import re

import pytest

from apptest import TINY, clean_launcher_env, main_in_process, run_app

pytestmark = pytest.mark.slow  # multirun sweeps of app runs


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    clean_launcher_env(monkeypatch)


def failing_job(monkeypatch, seed: int, error: Exception) -> None:
    """The job with ``seed`` fails at run time (inside the trainer) with ``error``."""
    from sparsecomm.app import trainer

    real_fit = trainer.Trainer.fit

    def fit(self):
        if int(self.cfg.seed) == seed:
            raise error
        return real_fit(self)
    monkeypatch.setattr(trainer.Trainer, "fit", fit)


def job_lines(out: str) -> dict[int, str]:
    return {int(m.group(1)): m.group(0) for m in re.finditer(r"^  #(\d+)\s+.*$", out, re.M)}


def summary_acc(folder) -> float:
    return json.loads((folder / "summary.json").read_text())["test_acc"]


def test_a_failed_job_does_not_stop_the_sweep_and_every_job_is_reported(tmp_path, capsys, monkeypatch):
    failing_job(monkeypatch, 1, ValueError("batch_size=1000 is more than this rank's 898 training examples"))
    code, out, err = main_in_process(["-m", *TINY, f"out_dir={tmp_path}", "run_id=s", "seed=0,1,2"], capsys)
    assert code == 2, err
    assert "error: batch_size=1000 is more than" in err and "Traceback" not in err
    lines = job_lines(out)
    assert sorted(lines) == [0, 1, 2], out
    sweep_dir = tmp_path / "multirun" / "s"
    for n in (0, 2):
        assert " ran " in lines[n] and "seed=" in lines[n] and f"{summary_acc(sweep_dir / str(n)):.4f}" in lines[n]
    assert " failed " in lines[1] and "batch_size=1000 is more than" in lines[1]
    assert not (sweep_dir / "1" / "summary.json").exists()
    assert "3 jobs: 2 ran, 1 failed, 0 not started" in out


def test_stop_sweep_on_failure_starts_no_further_job_and_says_so(tmp_path, capsys, monkeypatch):
    failing_job(monkeypatch, 1, ValueError("a bad value"))
    code, out, err = main_in_process(["-m", *TINY, f"out_dir={tmp_path}", "run_id=s", "seed=0,1,2",
                                      "stop_sweep_on_failure=true"], capsys)
    assert code == 2, err
    lines = job_lines(out)
    assert " ran " in lines[0] and " failed " in lines[1] and "a bad value" in lines[1]
    assert " not started " in lines[2] + " " and not (tmp_path / "multirun" / "s" / "2").exists()
    assert "3 jobs: 1 ran, 1 failed, 1 not started" in out


def test_a_crashing_job_shows_its_traceback_and_the_sweep_goes_on(tmp_path, capsys, monkeypatch):
    failing_job(monkeypatch, 0, RuntimeError("a bug"))
    code, out, err = main_in_process(["-m", *TINY, f"out_dir={tmp_path}", "run_id=c", "seed=0,1"], capsys)
    assert code == 1, err
    assert "Traceback" in err and "RuntimeError: a bug" in err  # a bug keeps its traceback
    lines = job_lines(out)
    assert " failed " in lines[0] and "RuntimeError: a bug" in lines[0]
    assert " ran " in lines[1] and (tmp_path / "multirun" / "c" / "1" / "summary.json").exists()


def test_a_second_sweep_into_a_live_sweep_folder_is_refused(tmp_path, capsys):
    from sparsecomm.app import runlock

    folder = tmp_path / "multirun" / "live"
    folder.mkdir(parents=True)
    held = runlock.acquire(str(folder))  # a live sweep holds it (its lock, as the app takes it)
    try:
        code, _, err = main_in_process(["-m", *TINY, f"out_dir={tmp_path}", "run_id=live", "seed=0,1"], capsys)
    finally:
        held.release()
    assert code == 2 and "in use by a live run" in err and str(folder) in err, err


def test_the_submitit_launcher_reports_every_job_the_same_way(tmp_path):
    """Jobs in processes of their own (submitit's local executor, as on Slurm): the sweep's process
    reads their records. Job 1 fails at run time for real (a batch larger than the rank's shard)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    proc = run_app(["-m", "hydra/launcher=submitit_local", *TINY, f"out_dir={tmp_path}", "run_id=sub",
                    "batch_size=8,5000"], tmp_path, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = job_lines(proc.stdout)
    assert " ran " in lines[0] and f"{summary_acc(tmp_path / 'multirun' / 'sub' / '0'):.4f}" in lines[0]
    assert " failed " in lines[1] and "batch_size=5000" in lines[1] and "lower batch_size" in lines[1], lines
