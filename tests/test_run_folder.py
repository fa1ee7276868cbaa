"""One live run per folder (sparsecomm/app/runlock.py), and run-folder files that are data, not
trust (config.yaml, metrics.jsonl, the lock file, checkpoints), through the app's real entry point.

References: an uninterrupted run of the same config (its model.safetensors, bit for bit), the
process ids the OS gives the runs, and ``json.loads`` of every line a reader of metrics.jsonl reads.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from apptest import (APP, TINY, app_env, clean_launcher_env, crash_runs_before, descendants, error_lines,
                     launcher_workers, main_in_process, read_events, torchrun_app, worker_pid)
from sparsecomm.app import rundir

pytestmark = pytest.mark.slow  # concurrent, killed and resumed app runs: 10-30 s each

LONG = ["steps=200", "batch_size=8", "eval_every=0", "eval_batch_size=128", "logging.progress=false",
        "logging.log_every=1", "++mask.num_samples=16", "schedule.dense_steps=1", "cluster.num_threads=1",
        "checkpoint.every=20"]


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    clean_launcher_env(monkeypatch)


def start(tmp_path: Path, run_id: str, nproc: int) -> subprocess.Popen:
    return subprocess.Popen([str(APP), *LONG, f"cluster.nproc_per_node={nproc}", f"out_dir={tmp_path}",
                             f"run_id={run_id}"], cwd=tmp_path, env=app_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_until(proc: subprocess.Popen, done, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not done():
        assert proc.poll() is None, f"the run ended before {what}: {proc.communicate()[1][-3000:]}"
        assert time.time() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.2)


def train_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_events(run_dir) if r["event"] == "train"]


def assert_each_step_once(run_dir: Path, last: int) -> None:
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        json.loads(line)  # every line a whole record
    assert train_steps(run_dir) == list(range(1, last + 1))


# --- case: one live run per folder -----------------------------------------------------------------

def test_a_second_command_on_a_live_run_is_refused_in_one_line(tmp_path):
    """The app's own launcher (2 workers) holds the folder; a second command is refused, the first finishes."""
    first = start(tmp_path, "live", nproc=2)
    run_dir = tmp_path / "live"
    wait_until(first, lambda: any(r["event"] == "train" for r in read_events(run_dir, live=True)), "training")
    os.killpg(first.pid, signal.SIGSTOP)  # alive, holding its lock, and certainly not finished meanwhile
    try:
        second = subprocess.run([str(APP), *LONG, "cluster.nproc_per_node=2", f"out_dir={tmp_path}", "run_id=live"],
                                cwd=tmp_path, env=app_env(), capture_output=True, text=True, timeout=300)
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
    (line,) = error_lines(second.stderr)
    assert str(run_dir) in line and "in use by a live run" in line and f"pid={first.pid}" in line, line
    assert "run_id=" in line
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert_each_step_once(run_dir, 200)
    assert not (tmp_path / "live" / "checkpoints" / ".tmp").exists()


def test_two_commands_started_together_one_trains_the_other_is_refused(tmp_path):
    procs = [start(tmp_path, "same", nproc=1) for _ in range(2)]
    results = [(p.wait(timeout=600), p.communicate()[1]) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], [err[-2000:] for _, err in results]
    (refused,) = [err for code, err in results if code == 2]
    (line,) = error_lines(refused)
    assert str(tmp_path / "same") in line, line
    assert_each_step_once(tmp_path / "same", 200)
    assert sorted(os.listdir(tmp_path)) == ["same"]


def test_a_sigkilled_run_resumes_and_its_workers_end_with_it(tmp_path):
    first = start(tmp_path, "killed", nproc=2)
    run_dir = tmp_path / "killed"
    wait_until(first, lambda: (run_dir / "checkpoints" / "step-00000020.ckpt").exists()
               and max([0, *[r["step"] for r in read_events(run_dir, live=True)]]) > 22, "a checkpoint")
    workers = descendants(first.pid)  # the workers, and their forkserver if it started them
    assert len(launcher_workers(first.pid)) == 2, workers
    first.send_signal(signal.SIGKILL)  # the launcher alone: its lock goes with it, and so must its workers
    first.wait(timeout=60)
    deadline = time.time() + 60
    while any(os.path.exists(f"/proc/{w}") and "Z" not in open(f"/proc/{w}/stat").read().split()[2] for w in workers):
        assert time.time() < deadline, "a worker outlived the launcher that held the run folder"
        time.sleep(0.2)
    again = subprocess.run([str(APP), *LONG, "cluster.nproc_per_node=2", f"out_dir={tmp_path}", "run_id=killed"],
                           cwd=tmp_path, env=app_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr
    assert_each_step_once(run_dir, 200)
    (resume,) = [r for r in read_events(run_dir) if r["event"] == "resume"]
    assert resume["step"] >= 20 and resume["step"] % 20 == 0


# --- case: run-folder files are data -----------------------------------------------------------------

CRASHED = [*TINY, "steps=8", "checkpoint.every=2", "logging.log_every=1"]
_CACHE: dict[str, Path] = {}


def reference_model(tmp_path_factory, capsys) -> bytes:
    """model.safetensors of the uninterrupted run (computed once)."""
    if "reference" not in _CACHE:
        out = tmp_path_factory.mktemp("reference")
        code, _, err = main_in_process([*CRASHED, f"out_dir={out}", "run_id=ref"], capsys)
        assert code == 0, err
        _CACHE["reference"] = out / "ref"
    return (_CACHE["reference"] / "model.safetensors").read_bytes()


def crashed_run(tmp_path_factory, capsys, monkeypatch, out: Path) -> Path:
    """A copy of a run that wrote checkpoints at steps 2 and 4 of 8 and crashed before step 6."""
    if "crashed" not in _CACHE:
        template = tmp_path_factory.mktemp("crashed")
        finish = crash_runs_before(monkeypatch, 5)
        code, _, err = main_in_process([*CRASHED, f"out_dir={template}", "run_id=r"], capsys)
        finish()
        assert code == 1 and "Crash" in err
        assert train_steps(template / "r") == [1, 2, 3, 4, 5]
        _CACHE["crashed"] = template / "r"
    shutil.copytree(_CACHE["crashed"], out / "r")
    return out / "r"


def damage(run_dir: Path, kind: str) -> str:
    """Damage one file of the crashed run's folder; the file a message should name (or '')."""
    config = run_dir / "config.yaml"
    if kind == "config-list":
        config.write_text("- a\n- b\n")
    elif kind == "config-empty":
        config.write_text("")
    elif kind == "config-cut":
        config.write_bytes(config.read_bytes()[: len(config.read_bytes()) // 2])
    elif kind == "config-garbage":
        config.write_bytes(bytes(range(256)) * 3)
    elif kind == "config-missing":
        config.unlink()
        return ""
    elif kind == "metrics-cut-line":
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write('{"event": "train", "step": 6, "lo')
        return ""
    elif kind == "lock-garbage":
        (run_dir / ".lock").write_bytes(b"\x00\xff" * 100)
        return ""
    elif kind == "newest-checkpoint-cut":
        ckpt = run_dir / "checkpoints" / "step-00000004.ckpt"
        ckpt.write_bytes(ckpt.read_bytes()[:100])
        return str(ckpt)
    return str(config)


@pytest.mark.parametrize("kind", ["config-list", "config-empty", "config-cut", "config-garbage", "config-missing",
                                  "metrics-cut-line", "lock-garbage", "newest-checkpoint-cut"])
def test_a_damaged_run_file_still_resumes_the_run_exactly(tmp_path, tmp_path_factory, capsys, monkeypatch, kind):
    run_dir = crashed_run(tmp_path_factory, capsys, monkeypatch, tmp_path)
    named = damage(run_dir, kind)
    code, _, err = main_in_process([*CRASHED, f"out_dir={tmp_path}", "run_id=r"], capsys)
    assert code == 0 and "Traceback" not in err, err
    resumed_at = 2 if kind == "newest-checkpoint-cut" else 4
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{resumed_at:08d}.ckpt'}" in err, err
    if named:
        assert named in err, err  # the damaged file is named
    assert (run_dir / "model.safetensors").read_bytes() == reference_model(tmp_path_factory, capsys)
    saved, why = rundir.read_config_record(str(run_dir / "config.yaml"), {"steps": 8})
    assert saved is not None and saved.steps == 8, why  # written again, whole
    assert_each_step_once(run_dir, 8)
    (resume,) = [r for r in read_events(run_dir) if r["event"] == "resume"]
    assert resume["step"] == resumed_at
    assert resume["dropped_records"] >= 1  # the crashed run's step-5 records (and the cut line) went


def test_a_damaged_config_without_checkpoints_is_one_line(tmp_path, capsys, monkeypatch):
    finish = crash_runs_before(monkeypatch, 3)
    args = [*TINY, f"out_dir={tmp_path}", "run_id=n", "logging.log_every=1"]
    assert main_in_process(args, capsys)[0] == 1
    finish()
    (tmp_path / "n" / "config.yaml").write_text("- not\n- a mapping\n")
    code, _, err = main_in_process(args, capsys)
    assert code == 2 and "Traceback" not in err
    (line,) = error_lines(err)
    assert str(tmp_path / "n") in line and "nothing to resume" in line and "run_id=" in line, line


def test_under_torchrun_rank_zero_holds_the_folder_and_a_second_job_is_refused(tmp_path):
    """torchrun: global rank 0 owns the folder; a second job's rank 0 is refused in one line, its
    other rank waits on nothing (torchrun ends the job), and the first job finishes."""
    args = [arg for arg in LONG if not arg.startswith("cluster.")]
    first = torchrun_app(tmp_path, "tr", args)
    run_dir = tmp_path / "tr"
    wait_until(first, lambda: any(r["event"] == "train" for r in read_events(run_dir, live=True)), "training")
    stopped = [first.pid, worker_pid("tr", 0), worker_pid("tr", 1)]
    assert None not in stopped
    assert f"pid={stopped[1]} " in (run_dir / ".lock").read_text()  # rank 0's process, not torchrun's
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        second = torchrun_app(tmp_path, "tr", args)
        _, err = second.communicate(timeout=300)
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    assert second.returncode != 0
    (line,) = error_lines(err)
    assert "in use by a live run" in line and str(run_dir) in line, line
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert_each_step_once(run_dir, 200)


def test_metrics_without_the_checkpoint_record_are_cut_at_its_step(tmp_path):
    """A metrics.jsonl without the resumed checkpoint's record (a checkpoint.dir elsewhere, a cut file):
    records up to that step's train/eval stay, the rest (the step's next mask, later steps, junk) go."""
    from sparsecomm.app.metrics import rewind_records

    records = [{"event": "mask", "step": 0}, *[{"event": "train", "step": s} for s in (1, 2, 3, 4)],
               {"event": "eval", "step": 4}, {"event": "mask", "step": 4}, {"event": "train", "step": 5}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "not json\n" + '{"event": "tr')
    assert rewind_records(str(path), 4) == 4
    assert [json.loads(line) for line in path.read_text().splitlines()] == records[:6]
