"""Run the app as users run it (``torchrun -m sparsecomm.app.train``) and read what it writes.

Shared by the benchmarks that drive whole runs (``soak.py``) and the tests that do
(``tests/test_elastic.py``, ``tests/test_exit.py``, ... through ``tests/apptest.py``)::

    proc = torchrun_app(out, "run1", ["steps=40"], nproc=2, max_restarts=1)
    events = read_events(out / "run1", live=True)   # metrics.jsonl, while it is being written
    os.kill(worker_pid("run1", rank=1), signal.SIGKILL)

Standard library only: importing it costs nothing.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

# A launcher's variables in the caller's own environment would make the app join instead of launch.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "SLURM_PROCID", "SLURM_NTASKS",
                 "SLURM_JOB_ID", "SLURM_RESTART_COUNT", "SPARSECOMM_TRACEBACK")


def app_env(**extra: str) -> dict[str, str]:
    """This process's environment without launcher (and Slurm) variables, unbuffered, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("SLURM_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_app_cmd(args: list[str], *, nproc: int = 2, run_id: str = "run", max_restarts: int = 0) -> list[str]:
    """``python -m torch.distributed.run ... -m sparsecomm.app.train args``: one node, c10d rendezvous
    on a free local port, ``nproc`` workers, ``max_restarts`` elastic restarts."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
            "--max-restarts", str(max_restarts), "--rdzv-backend", "c10d", "--rdzv-endpoint",
            f"127.0.0.1:{free_port()}", "--rdzv-id", run_id, "--monitor-interval", "0.1",
            "-m", "sparsecomm.app.train", *args]


def torchrun_app(out: Path, run_id: str, args: list[str], *, nproc: int = 2, max_restarts: int = 0,
                 log: Path | None = None) -> subprocess.Popen:
    """Start the app under torchrun in ``out`` (run folder ``out/run_id``), one thread per worker.

    Output goes to ``log`` if given (a file the child writes until it exits), else to pipes
    (text) that the caller reads with ``communicate()``.
    """
    cmd = torchrun_app_cmd([*args, f"out_dir={out}", f"run_id={run_id}"], nproc=nproc, run_id=run_id,
                           max_restarts=max_restarts)
    env = app_env(OMP_NUM_THREADS="1")
    if log is not None:
        with open(log, "w") as f:  # the child holds its own descriptor
            return subprocess.Popen(cmd, cwd=out, env=env, stdout=f, stderr=subprocess.STDOUT)
    return subprocess.Popen(cmd, cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_events(run_dir: str | os.PathLike, *, live: bool = False) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl``, in order (``[]`` if the file is not there yet).

    ``live=True`` (a run still writing): an incomplete last line is left out. Otherwise every
    line must be whole JSON, and a broken one raises ``json.JSONDecodeError``.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if not (live and i == len(lines) - 1):  # only the line being written may be cut
                raise
    return out


def worker_pid(run_id: str, rank: int) -> int | None:
    """The pid of the worker of torchrun run ``run_id`` with this RANK (from /proc/<pid>/environ)."""
    want = {f"TORCHELASTIC_RUN_ID={run_id}".encode(), f"RANK={rank}".encode()}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            env = set(Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if want <= env:
            return int(entry)
    return None
