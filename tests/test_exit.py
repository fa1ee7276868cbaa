"""How runs end: a finished torchrun job exits 0; a bad value is one line, not retried; Ctrl-C and
SIGTERM stop at a step boundary with one line and a checkpoint to resume from."""
from __future__ import annotations

import gc
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from apptest import (APP, REPO, TINY, app_env, clean_launcher_env, compose_app, main_in_process, read_events,
                     torchrun_app_cmd)

pytestmark = pytest.mark.slow  # torchrun launches and signals: 4-470 s per test

# A short job that still builds DDP, the masked hook and both optimizers on 2 ranks.
SHORT = ["task=synthetic", "task.in_features=16", "task.hidden=32", "task.depth=1", "task.num_train=256",
         "task.num_test=64", "steps=6", "schedule.dense_steps=2", "batch_size=8", "eval_every=0",
         "logging.progress=false", "mask.num_samples=16", "mask.density=0.5", "cluster.num_threads=1"]


def test_nothing_of_ddp_or_the_process_group_outlives_the_run(tmp_path, monkeypatch):
    """The cause of the exit-time SIGABRT under torchrun: the trainer sits in reference cycles
    (DDP -> comm hook state -> ...) that only the cyclic GC frees, possibly during interpreter
    shutdown, when Gloo threads can no longer take the GIL. ``trainer.run`` must free them itself."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from sparsecomm.app import trainer

    clean_launcher_env(monkeypatch)
    cfg = compose_app(*TINY, f"out_dir={tmp_path}", "run_id=gc")
    gc.collect()
    gc.disable()  # as at interpreter exit: nothing frees cycles unless the code does
    try:
        trainer.run(cfg, str(tmp_path / "gc"))
        alive = [o for o in gc.get_objects() if isinstance(o, DistributedDataParallel)]
        assert not alive, f"{len(alive)} DDP object(s) still alive after the run"
        assert not dist.is_initialized()
    finally:
        gc.enable()


def test_leaving_the_group_holds_it_until_the_exit_pause(tmp_path):
    """A Gloo worker may hold the last reference to its group (PowerSGD's callbacks capture it); if
    it dropped it, the group's destructor would join the workers from one of them and abort the
    process. ``leave_process_group`` destroys the group and keeps it until the exit pause frees it."""
    import torch.distributed as dist

    from sparsecomm import distributed as sdist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    group = dist.group.WORLD
    sdist.leave_process_group()
    assert not dist.is_initialized()
    assert any(g is group for g in sdist._groups_left)
    sdist._pause_for_comm_threads()  # what atexit runs
    assert not sdist._groups_left
    sdist.leave_process_group()  # outside a group: nothing to do


# The exit abort seen before the fix came about once in five launches. Its cause is checked directly
# above; these launches, the README script's 4 (tests/test_docs.py) and every other torchrun job of
# the suite that must exit 0 (test_app, test_run_folder, test_elastic, the examples, the benchmarks'
# runs: dozens) are its statistical guard.
LAUNCHES = 4


@pytest.mark.timeout(1200)
def test_repeated_torchrun_launches_all_exit_zero(tmp_path):
    """A finished run must end with exit code 0 every time: short 2-rank jobs under torchrun,
    two at a time (a launch is mostly interpreter start-up on one core: two overlap well)."""
    env = {**app_env(), "OMP_NUM_THREADS": "1"}

    def launch(i: int) -> str | None:
        cmd = torchrun_app_cmd([*SHORT, "save_model=false", f"out_dir={tmp_path}", "cluster.nproc_per_node=2"],
                               nproc=2, run_id=f"run{i}")
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0 or "terminate called" in proc.stderr or proc.stdout.count("== sparsecomm summary") != 1:
            own = [line for line in proc.stderr.splitlines() if line.startswith(("sparsecomm", "error:"))]
            return f"launch {i}: rc {proc.returncode}; the app said: {own}\n{proc.stderr[-2000:]}"
        return None

    with ThreadPoolExecutor(max_workers=2) as pool:
        failures = [f for f in pool.map(launch, range(LAUNCHES)) if f is not None]
    assert not failures, "\n".join(failures)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"run{i}" for i in range(LAUNCHES))


def test_a_bad_value_under_the_torchrun_script_is_one_line_and_never_retried(tmp_path):
    env = {**app_env(), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "cluster" / "torchrun_local.sh"), "mask.density=7",
                           f"out_dir={tmp_path}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: mask.density=7"), proc.stderr
    assert not list(tmp_path.iterdir())  # torchrun never started; no folder


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_quiet_rank_leaves_rank_zero_time_to_print_a_shared_error(tmp_path, capsys, monkeypatch, rank):
    """Under torchrun the first worker to exit ends the others: a rank that keeps quiet about an error
    every rank shares must not exit before rank 0 has printed it (its line was lost under load)."""
    from sparsecomm.app import errors

    clean_launcher_env(monkeypatch)
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    waits = []
    monkeypatch.setattr(errors.time, "sleep", waits.append)
    code, _, err = main_in_process(["mask.density=7", f"out_dir={tmp_path}"], capsys)
    assert code == 2
    if rank == "0":
        assert err.startswith("error: mask.density=7") and waits == []
    else:
        assert err == "" and waits == [errors.QUIET_RANK_GRACE_S]


def test_under_torchrun_rank_zero_alone_reports_a_bad_value(tmp_path):
    """Straight torchrun (no script): every rank checks the config, rank 0 alone prints it."""
    cmd = torchrun_app_cmd([*SHORT, "mask.density=7", f"out_dir={tmp_path}"], nproc=2, run_id="bad")
    proc = subprocess.run(cmd, cwd=tmp_path, env={**app_env(), "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    assert sum(line.startswith("error: mask.density=7") for line in proc.stderr.splitlines()) == 1, proc.stderr


def start_long_run(tmp_path: Path, run_id: str, nproc: int, extra=()) -> subprocess.Popen:
    args = ["steps=3000", "batch_size=32", "eval_every=0", "logging.progress=false", "logging.log_every=5",
            "mask.num_samples=32", "schedule.dense_steps=5", "checkpoint.every=1000", "cluster.num_threads=1",
            f"cluster.nproc_per_node={nproc}", f"out_dir={tmp_path}", f"run_id={run_id}", *extra]
    return subprocess.Popen([str(APP), *args], cwd=tmp_path, env=app_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_training(proc: subprocess.Popen, run_dir: Path, timeout: float = 240, seen: int = 0) -> None:
    """Until a train record beyond the first ``seen`` records of ``metrics.jsonl`` appears."""
    deadline = time.time() + timeout
    while not any(e["event"] == "train" for e in read_events(run_dir, live=True)[seen:]):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "the run did not start training"
        time.sleep(0.2)


@pytest.mark.parametrize("sig,nproc", [(signal.SIGINT, 2), (signal.SIGTERM, 1), (signal.SIGHUP, 2)])
def test_a_signal_stops_at_a_step_boundary_with_a_checkpoint_and_one_line(tmp_path, sig, nproc):
    from sparsecomm.checkpoint import CheckpointManager

    proc = start_long_run(tmp_path, "sig", nproc)
    run_dir = tmp_path / "sig"
    wait_for_training(proc, run_dir)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-3000:]
    assert "Traceback" not in err and "SignalException" not in err, err[-3000:]
    stopped = [line for line in err.splitlines() if "interrupted by" in line]
    assert len(stopped) == 1 and stopped[0].startswith(f"sparsecomm: interrupted by {sig.name} at step"), err
    step = int(stopped[0].split(" at step ")[1].split()[0])
    assert 0 < step < 3000 and (nproc == 1 or step % 5 == 0)  # several ranks agree at a log step
    found = CheckpointManager(str(run_dir / "checkpoints")).latest_verified()
    assert found is not None and found[0].endswith(f"step-{step:08d}.ckpt")
    assert "run_id=sig" in err and "resume with: sparsecomm-train" in err
    # The hinted command continues from that checkpoint (stopped again at once: the point is the resume).
    seen = len(read_events(run_dir, live=True))
    again = start_long_run(tmp_path, "sig", nproc)
    wait_for_training(again, run_dir, seen=seen)
    again.send_signal(signal.SIGTERM)
    _, err2 = again.communicate(timeout=120)
    assert f"resumed from {found[0]} at step {step}" in err2, err2[-3000:]


def test_sigterm_without_checkpoints_says_a_rerun_starts_afresh(tmp_path):
    proc = start_long_run(tmp_path, "nock", 1, extra=["checkpoint.every=0"])
    wait_for_training(proc, tmp_path / "nock")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "no checkpoint (checkpoint.every=0)" in err and "Traceback" not in err, err[-3000:]
    assert not (tmp_path / "nock" / "checkpoints").exists()
