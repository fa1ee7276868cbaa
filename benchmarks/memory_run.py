"""Fresh processes for the memory figures and the memory cgroup the 2-rank checks run in.

:func:`run_fresh` starts ``world`` processes of :mod:`benchmarks.memory_worker` (Gloo over
127.0.0.1 when more than one), optionally inside a :class:`Cage`, and collects each rank's
``[memory] {json}`` line.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(threads: int, glibc_default: bool = False) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    if not glibc_default:  # blocks >= 128 KiB are mmapped and go back to the OS when freed: RSS = live memory
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 << 10))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
    return env


def run_fresh(spec: dict, *, world: int = 1, cage: "Cage | None" = None, timeout: float = 1800) -> dict:
    """Run ``spec`` in ``world`` fresh processes (ranks, Gloo over 127.0.0.1), optionally inside ``cage``.

    Returns ``{"ok", "ranks": [rank results], "rc": [exit codes], "tail"}``.
    """
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
        spec_path = f.name
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    try:
        for r in range(world):
            env = _env(int(spec.get("threads", 1)), bool(spec.get("glibc_default")))
            if world > 1:
                env.update(RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            cmd = [sys.executable, "-m", "benchmarks.memory_worker", spec_path]
            if cage is not None:
                cmd = cage.wrap(cmd)
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outs, rcs = [], []
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                o, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                o, _ = p.communicate()
            outs.append(o)
            rcs.append(p.returncode)
            if p.returncode != 0:  # a rank died (e.g. OOM-killed): the others would wait forever
                for q in procs:
                    if q.poll() is None:
                        q.kill()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        os.unlink(spec_path)
    ranks = []
    for o in outs:
        for line in o.splitlines():
            if line.startswith("[memory] "):
                ranks.append(json.loads(line[len("[memory] "):]))
    ok = all(rc == 0 for rc in rcs) and len(ranks) == world
    return {"ok": ok, "ranks": ranks, "rc": rcs, "tail": "\n".join("\n".join(o.splitlines()[-6:]) for o in outs)}


class Cage:
    """A memory cgroup (v2 ``memory.max``, else v1 ``memory.limit_in_bytes``) that the ranks start in.

    The OOM killer acts inside it only: a run that needs more than the cap is killed, nothing
    else on the machine is touched. Needs root; removed on exit.
    """

    def __init__(self, cap_bytes: int, name: str | None = None):
        self.cap = int(cap_bytes)
        name = name or f"sparsecomm-memory-{os.getpid()}"
        v2 = "/sys/fs/cgroup"
        if os.path.exists(os.path.join(v2, "cgroup.controllers")):
            self.version, self.path = 2, os.path.join(v2, name)
        elif os.path.isdir("/sys/fs/cgroup/memory"):
            self.version, self.path = 1, os.path.join("/sys/fs/cgroup/memory", name)
        else:
            raise RuntimeError("no memory cgroup (v2 or v1) under /sys/fs/cgroup")

    def __enter__(self) -> "Cage":
        os.makedirs(self.path, exist_ok=True)
        if self.version == 2:
            self._write("memory.max", str(self.cap))
            self._write("memory.swap.max", "0", missing_ok=True)
        else:
            self._write("memory.limit_in_bytes", str(self.cap))
            self._write("memory.memsw.limit_in_bytes", str(self.cap), missing_ok=True)
        return self

    def _write(self, fname: str, value: str, missing_ok: bool = False) -> None:
        try:
            with open(os.path.join(self.path, fname), "w") as f:
                f.write(value)
        except OSError:
            if not missing_ok:
                raise

    def _read(self, fname: str) -> str | None:
        try:
            with open(os.path.join(self.path, fname)) as f:
                return f.read()
        except OSError:
            return None

    def wrap(self, cmd: list[str]) -> list[str]:
        """A command line that joins this cgroup, then execs ``cmd`` (children stay in it)."""
        procs = os.path.join(self.path, "cgroup.procs")
        return ["/bin/sh", "-c", f'echo $$ > "{procs}" && exec "$@"', "sh", *cmd]

    def reset_peak(self) -> None:
        if self.version == 1:
            self._write("memory.max_usage_in_bytes", "0", missing_ok=True)

    def peak(self) -> int | None:
        v = self._read("memory.peak" if self.version == 2 else "memory.max_usage_in_bytes")
        return int(v) if v and v.strip().isdigit() else None

    def oom_kills(self) -> int:
        text = self._read("memory.events" if self.version == 2 else "memory.oom_control") or ""
        for line in text.splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def __exit__(self, *exc) -> None:
        for _ in range(50):
            try:
                os.rmdir(self.path)
                return
            except OSError:
                time.sleep(0.1)


def meminfo_bytes(field: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)

