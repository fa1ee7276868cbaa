"""A peer that stops answering ends the run within ``cluster.timeout_s`` plus a margin, with one
line per surviving rank naming the step, the silent rank and the resume command (2 local Gloo
ranks; the multi-node cases, a node's link down and a stopped worker, are in tests/test_box.py)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from apptest import APP, app_env, launcher_workers, read_events, torchrun_app_cmd, worker_pid

TIMEOUT_S = 10
# The stopped-worker runs mostly wait (cluster.timeout_s, then torch elastic's 30 s before it SIGKILLs
# the stopped worker), as do the box's tests (its own stopped worker among them). Both runs wait
# together (one fixture), on the box's xdist worker, so that no two waits on different workers
# leave the cores idle.
STOPPED = "netns"
MARGIN_S = 60  # the silent-rank check (3 heartbeat intervals), the launcher's shutdown, interpreter exits
JOB = ["steps=100000", "batch_size=32", "eval_every=0", "logging.progress=false", "logging.log_every=5",
       "mask.num_samples=32", "schedule.dense_steps=5", "checkpoint.every=20", "cluster.num_threads=1",
       f"cluster.timeout_s={TIMEOUT_S}"]


def wait_for_step(run_dir: Path, proc: subprocess.Popen, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not any(e["event"] == "train" and e["step"] >= step for e in read_events(run_dir, live=True)):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"no train record at step {step} after {timeout} s"
        time.sleep(0.2)


def last_step(run_dir: Path) -> int:
    return max(e["step"] for e in read_events(run_dir, live=True) if e["event"] == "train")


def a_worker_of(launcher: int) -> int:
    """A training worker our launcher started (not its forkserver or multiprocessing's resource tracker)."""
    workers = launcher_workers(launcher)
    assert len(workers) == 2, workers
    return max(workers)


def stop_and_wait(proc: subprocess.Popen, pid: int) -> tuple[str, float]:
    """SIGSTOP ``pid`` (a worker); the launcher's stderr and the seconds it took to exit."""
    os.kill(pid, signal.SIGSTOP)
    t = time.monotonic()
    try:
        _, err = proc.communicate(timeout=TIMEOUT_S + MARGIN_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        err = proc.communicate()[1] + "\n[test] the launcher was still running"
    finally:
        try:
            os.kill(pid, signal.SIGKILL)  # the stopped worker, if the launcher left it
        except ProcessLookupError:
            pass
    return err, time.monotonic() - t


def stopped_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "stopped answering" in line]


@dataclass
class Stopped:
    """A 2-rank run whose worker ``pid`` was SIGSTOPped after step ``last`` was logged."""
    proc: subprocess.Popen
    run_id: str
    pid: int
    last: int
    err: str
    took: float


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> dict[str, Stopped]:
    """Two runs started together, our launcher's (``ours``) and torchrun's (``torchrun``), each with one
    worker SIGSTOPped once it has logged step 25; both launchers are then waited for at once."""
    ours_out, torchrun_out = tmp_path_factory.mktemp("ours"), tmp_path_factory.mktemp("torchrun")
    torchrun_id = f"tr{os.getpid()}"  # unique on this host: worker_pid finds the worker by it
    procs = {
        "ours": (subprocess.Popen([str(APP), *JOB, "cluster.nproc_per_node=2", f"out_dir={ours_out}", "run_id=stop"],
                                  cwd=ours_out, env=app_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True), "stop", ours_out),
        "torchrun": (subprocess.Popen(torchrun_app_cmd([*JOB, "cluster.nproc_per_node=2", f"out_dir={torchrun_out}"],
                                                       nproc=2, run_id=torchrun_id),
                                      cwd=torchrun_out, env=app_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True), torchrun_id, torchrun_out),
    }
    try:
        for proc, run_id, out in procs.values():
            wait_for_step(out / run_id, proc, 25)
        pids = {"ours": a_worker_of(procs["ours"][0].pid), "torchrun": worker_pid(torchrun_id, 1)}
        lasts = {k: last_step(out / run_id) for k, (_, run_id, out) in procs.items()}
        with ThreadPoolExecutor(max_workers=2) as pool:
            waited = {k: pool.submit(stop_and_wait, proc, pids[k]) for k, (proc, _, _) in procs.items()}
            results = {k: f.result() for k, f in waited.items()}
    finally:
        for proc, _, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return {k: Stopped(proc, run_id, pids[k], lasts[k], *results[k]) for k, (proc, run_id, _) in procs.items()}


@pytest.mark.slow  # waits out cluster.timeout_s after 25 steps of a 2-rank run
@pytest.mark.xdist_group(STOPPED)
def test_our_launcher_a_stopped_worker_ends_the_run_with_one_line(stopped):
    run = stopped["ours"]
    err, pid = run.err, run.pid
    assert run.proc.returncode not in (0, None), err[-3000:]
    lines = stopped_lines(err)
    assert len(lines) == 1, err[-3000:]
    line = lines[0]
    assert line.startswith("sparsecomm: stopped at step "), line
    assert re.search(rf": rank [01] \([^)]*, pid {pid}\) stopped answering", line), line
    assert f"cluster.timeout_s={TIMEOUT_S}" in line, line
    step = int(re.search(r"at step (\d+) of", line).group(1))
    assert step > run.last, (step, run.last)
    assert "resume with: sparsecomm-train " in line and "run_id=stop" in line, line
    assert "Traceback" not in err, err[-3000:]
    print(f"launcher ended {run.took:.1f} s after SIGSTOP (timeout {TIMEOUT_S} s): {line}")


@pytest.mark.slow  # waits out cluster.timeout_s after 25 steps of a 2-rank torchrun job
@pytest.mark.xdist_group(STOPPED)
def test_torchrun_a_stopped_worker_ends_both_ranks_and_torchrun(stopped):
    run = stopped["torchrun"]
    err, pid = run.err, run.pid
    assert run.proc.returncode not in (0, None), err[-3000:]
    lines = stopped_lines(err)
    assert len(lines) == 1, err[-3000:]  # rank 0 survives; rank 1 is the stopped one
    assert "rank 1 (" in lines[0] and f"pid {pid})" in lines[0], lines[0]
    assert f"resume with the same torchrun options (rdzv id {run.run_id})" in lines[0], lines[0]
    assert lines[0].endswith(f" run_id={run.run_id}"), lines[0]
    print(f"torchrun ended {run.took:.1f} s after SIGSTOP (timeout {TIMEOUT_S} s): {lines[0]}")


# What torch 2.x's Gloo and TCPStore raise when a peer is silent or gone (first lines, as raised).
PEER_ERRORS = [
    "Application timeout caused pair closure",  # DDP's buffer broadcast while the peer was SIGSTOPped
    "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error [127.0.0.1]:41934: Connection reset by peer",
    "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 10000ms for recv operation",
    "[../third_party/gloo/gloo/transport/tcp/pair.cc:598] Connection closed by peer [10.7.0.2]:27617",
    "[../third_party/gloo/gloo/transport/tcp/pair.cc:446] Socket closed [10.7.0.2]:46071",
    "Socket Timeout",
    "failed to recv, got 0 bytes: Socket unexpectedly closed",
]


@pytest.mark.parametrize("message", PEER_ERRORS)
def test_every_way_gloo_says_a_peer_is_gone_is_a_lost_peer(message):
    from sparsecomm.app.peers import is_peer_failure

    assert is_peer_failure(RuntimeError(message))
    assert is_peer_failure(RuntimeError(f"Got the following error when running the callback: {message}"))


def test_an_error_of_the_model_is_not_a_lost_peer():
    from sparsecomm.app.peers import is_peer_failure

    assert not is_peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied (32x64 and 16x32)"))
    assert not is_peer_failure(ValueError("Timed out waiting"))  # not torch's exception type


@pytest.mark.parametrize("value", ["0", "-5", "abc"])
def test_a_bad_timeout_is_one_line(tmp_path, value):
    proc = subprocess.run([str(APP), "--check", f"cluster.timeout_s={value}", f"out_dir={tmp_path}"], cwd=tmp_path,
                          env=app_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cluster.timeout_s"), proc.stderr
