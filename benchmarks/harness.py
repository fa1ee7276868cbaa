"""Launch the app's runs with torchrun inside an emulated link and collect rank 0's rows.

    with netem.Link("1gbit") as link:
        rows, failures = launch(link, nproc=2, spec={...}, workdir="benchmarks/results/tmp")

Each variant is one run of the app, in its own torchrun launch of :mod:`benchmarks.drive`: a
variant that fails is recorded as failed (with the output's tail) and the others still run, so
one broken variant costs one row. Every launch is bounded by ``timeout`` seconds; on expiry its
process group (the torchrun we started and its ranks) is killed.

Both sides of the spec and results files live here: :func:`run_worker` writes a spec, runs it and
reads back what rank 0 wrote (:func:`write_results`, atomically).
"""
from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque

from benchmarks.apprun import free_port

HERE = os.path.dirname(os.path.abspath(__file__))
DRIVER = "benchmarks.drive"  # the per-rank module torchrun starts (-m), from the repository root
_ports = itertools.count(29500)


def torchrun_cmd(nproc: int, port: int, module: str, *args: str, nnodes: int = 1, node_rank: int = 0,
                 master_addr: str = "127.0.0.1") -> list[str]:
    """torchrun running ``python -m module args`` on each rank (``module``: e.g. ``benchmarks.drive``)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--node_rank", str(node_rank),
            "--nproc_per_node", str(nproc), "--master_addr", master_addr, "--master_port", str(port), "-m", module,
            *args]


def worker_env(link, threads: int) -> dict:
    env = link.env(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1",
               LOGLEVEL="WARNING")
    root = os.path.dirname(HERE)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def run_torchrun(link, nproc: int, module: str, args: list[str], *, threads: int, timeout: float,
                 echo=print) -> tuple[int, str]:
    """Run the module ``module`` on ``nproc`` ranks inside ``link``; returns (exit code, last 60 output lines).

    On a multi-node link (``link.nnodes`` > 1, :mod:`boxlink`) ``nproc`` ranks per node: one
    torchrun per node, static rendezvous on node 1; the exit code is the first non-zero one.
    Lines starting with ``[worker]`` are echoed live. Exit code 124 means it was killed after
    ``timeout`` seconds.
    """
    port = next(_ports) if link.isolated else free_port()
    nnodes = getattr(link, "nnodes", 1)
    if nnodes == 1:
        cmds = [link.wrap(torchrun_cmd(nproc, port, module, *args))]
    else:
        cmds = [link.wrap_node(node, torchrun_cmd(nproc, port, module, *args, nnodes=nnodes, node_rank=i,
                                                  master_addr=link.master_addr))
                for i, node in enumerate(link.nodes)]
    tail: deque[str] = deque(maxlen=60)
    procs = [subprocess.Popen(cmd, env=worker_env(link, threads), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True) for cmd in cmds]

    def pump(proc):
        for line in proc.stdout:
            tail.append(line.rstrip())
            if line.startswith("[worker]"):
                echo("    " + line[len("[worker] "):].rstrip())

    readers = [threading.Thread(target=pump, args=(p,), daemon=True) for p in procs]
    for r in readers:
        r.start()
    deadline = time.monotonic() + timeout
    try:
        while True:  # until all exit, one fails (the other nodes would wait for it), or time is up
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed or all(c == 0 for c in codes):
                rc = failed[0] if failed else 0
                break
            if time.monotonic() > deadline:
                rc = 124
                tail.append(f"[harness] killed after {timeout:.0f} s")
                break
            time.sleep(0.1)
    finally:
        for proc in procs:
            if proc.poll() is None:
                _kill_group(proc)
    for r in readers:
        r.join(timeout=5)
    return rc, "\n".join(tail)


def run_worker(link, nproc: int, module: str, spec: dict, spec_path: str, *, threads: int, timeout: float,
               echo=print) -> tuple[int, str, dict | None]:
    """Write ``spec`` to ``spec_path``, run ``python -m module spec_path`` on ``nproc`` ranks (:func:`run_torchrun`)
    and read back the JSON the worker wrote to ``spec['out']``; both files are removed.

    Returns (exit code, last output lines, the worker's JSON or None if it wrote none).
    """
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    try:
        rc, tail = run_torchrun(link, nproc, module, [spec_path], threads=threads, timeout=timeout, echo=echo)
    finally:
        os.unlink(spec_path)
    written = None
    if os.path.exists(spec["out"]):
        with open(spec["out"]) as f:
            written = json.load(f)
        os.unlink(spec["out"])
    return rc, tail, written


def remove_workdir(workdir: str) -> None:
    """Remove the workers' scratch folder if it is empty (a launch that went wrong may leave files)."""
    try:
        os.rmdir(workdir)
    except OSError:
        pass


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop the torchrun we started (its own session) and its ranks: SIGTERM, then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def progress(row: dict) -> str:
    """One line on a finished run: step time and bytes per step, or its last accuracy point."""
    if "curve" in row:
        last = row["curve"][-1]
        return (f"accuracy {last['accuracy']:.3f}, {last['seconds']:.1f} s training, "
                f"{last['wire_bytes_per_rank'] / 1e6:.2f} MB/rank on the wire")
    return f"{row['step_s']:.3f} s/step, {row['wire_bytes_per_rank'] / 1e6:.3f} MB/rank/step on the wire"


def launch(link, nproc: int, spec: dict, *, workdir: str, timeout: float = 900.0, threads: int | None = None,
           echo=print) -> tuple[list[dict], dict[str, str]]:
    """Run each of ``spec['variants']`` as one app run on ``nproc`` ranks (:mod:`benchmarks.drive`, one
    torchrun launch per variant); returns (rows, {variant id: failure text})."""
    os.makedirs(workdir, exist_ok=True)
    threads = threads or max(1, (os.cpu_count() or 1) // nproc)
    rows: list[dict] = []
    failures: dict[str, str] = {}
    for n, variant in enumerate(spec["variants"]):
        tag = f"{spec.get('model', 'run')}-{link.rate}-n{nproc}-{os.getpid()}-{n}"
        spec_path = os.path.join(workdir, f"spec-{tag}.json")
        out_path = os.path.join(workdir, f"rows-{tag}.json")
        run_spec = dict(spec, variants=[variant], out=out_path, threads=threads, workdir=os.path.abspath(workdir))
        t0 = time.monotonic()
        rc, tail, written = run_worker(link, nproc, DRIVER, run_spec, spec_path, threads=threads, timeout=timeout,
                                       echo=echo)
        got = written["rows"] if written else []
        if rc != 0 or not got:
            failures[variant["id"]] = f"exit {rc} after {time.monotonic() - t0:.0f} s:\n{tail}"
            echo(f"    {variant['id']}: FAILED (exit {rc}); last lines:\n" +
                 "\n".join("      " + line for line in tail.splitlines()[-8:]))
            continue
        for r in got:
            r.update(link=link.label, link_note=link.fallback or "", threads=threads)
            echo(f"    {r['variant']:>16}: {progress(r)} ({time.monotonic() - t0:.1f} s)")
        rows.extend(got)
    return rows, failures


# --- inside a rank: the driver's side of the results file ------------------------------------------
def write_results(path: str, results: dict) -> None:
    """Replace ``path`` with ``results`` as JSON in one step, so a crash leaves the previous file whole."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f)
    os.replace(tmp, path)
