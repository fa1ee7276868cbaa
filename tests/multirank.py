"""Run a function on N ranks in child processes (file:// store: ~0.1 s to start a rank).

    results = run_ranks(fn, world_size=2, arg1, ...)   # fn(rank, world_size, *args) -> picklable

Every rank's return value comes back in rank order; an exception on any rank fails the caller
with that rank's traceback. A rank that hangs is killed after ``timeout`` seconds.

A rank that dies without a result fails the caller at once; a rank still running at the timeout
writes every thread's stack, which the failure shows. What the ranks print is written out as the
caller's own output, rank after rank, once they have ended.

Ranks are forked from a forkserver: a clean process started once per test process, with torch,
sparsecomm and the integrations' stacks imported (``PRELOAD``). Forking the test process itself is not safe: after
hundreds of tests it holds threads (Gloo's, OpenMP's, earlier runs'), and a lock one of them held at
the fork stays locked in the child for ever (ranks hung in ``torch.set_num_threads`` before their
first collective). ``fn`` and its arguments must therefore be picklable: a module-level function.

Gloo on CPU processes by default. For CUDA (tests/test_gpu.py): ``backend="nccl"`` or
Gloo with CUDA tensors, and ``start_method="spawn"`` (a forked child cannot use CUDA once the
parent has); each rank's current device is then ``cuda:(rank % device_count)``, set before
the process group starts.
"""
from __future__ import annotations

import contextlib
import faulthandler
import multiprocessing as mp
import os
import pickle
import queue as queue_module
import sys
import tempfile
import threading
import time
import traceback

import torch
import torch.distributed as dist

from sparsecomm import distributed as sdist


def _entry(fn, rank, world_size, init_file, queue, leave, args, backend="gloo", cuda=False, timeout=120.0):
    # a rank still running when the caller gives up writes where each of its threads is
    stacks = open(f"{init_file}.stacks.{rank}", "w")  # noqa: SIM115 - open until the process ends
    faulthandler.dump_traceback_later(max(timeout - 3, 1), exit=False, file=stacks)
    for fd, stream in ((1, "out"), (2, "err")):  # the caller replays them as its own output (capfd sees them)
        os.dup2(os.open(f"{init_file}.{stream}.{rank}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    try:
        torch.set_num_threads(1)
        if cuda:
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        try:
            # plain pickle: torch's shared-memory reductions would die with this process
            out = pickle.dumps(fn(rank, world_size, *args))
        finally:
            # DDP wrappers freed before their group, the group itself held to the end (os._exit): a
            # Gloo worker that dropped its last reference would destroy it there and abort the rank
            sdist.leave_process_group()
        queue.put((rank, True, out))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, False, traceback.format_exc()))
    # Write the result out, and end only when every rank has written its own: DDP keeps its Gloo
    # group and threads alive past destroy_process_group, and a peer's exit can make those threads
    # abort this process (SIGABRT) before its result has left.
    sys.stdout.flush()
    sys.stderr.flush()
    queue.close()
    queue.join_thread()
    with contextlib.suppress(threading.BrokenBarrierError):
        leave.wait(timeout=30)
    os._exit(0)


def _replay_output(init_file: str, world_size: int) -> None:
    """Each rank's stdout and stderr, in rank order, written as this process's own."""
    for rank in range(world_size):
        for stream, name in ((sys.stdout, "out"), (sys.stderr, "err")):
            with contextlib.suppress(OSError), open(f"{init_file}.{name}.{rank}", errors="replace") as f:
                stream.write(f.read())
            stream.flush()


def _stacks_of_hung_ranks(init_file: str, world_size: int, finished) -> list[str]:
    time.sleep(3.5)  # each rank writes its stacks 3 s before the caller's timeout
    found = []
    for rank in sorted(set(range(world_size)) - set(finished)):
        with contextlib.suppress(OSError), open(f"{init_file}.stacks.{rank}") as f:
            found.append(f"--- rank {rank}'s threads:\n{f.read()}")
    return found


# What the forkserver imports once, so that each rank forked from it starts in ~0.1 s instead of
# importing these again (the integrations' stacks take seconds). One that is not installed is skipped.
PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "torch.nn.parallel", "pytest", "sparsecomm",
           "sparsecomm.app.trainer", "multirank", "apptest", "trainrun",
           "transformers", "accelerate", "lightning.pytorch"]


def _context(start_method: str):
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload(PRELOAD)  # read when the server starts: the first call in this process
    return ctx


def run_ranks(fn, world_size: int, *args, timeout: float = 120.0, backend: str = "gloo",
              start_method: str = "forkserver", cuda: bool = False):
    """``fn(rank, world_size, *args)`` on ``world_size`` ranks of ``backend``; their results in rank order.

    ``cuda=True``: every rank sets its current CUDA device first (use with ``start_method="spawn"``).
    """
    ctx = _context(start_method)
    queue, leave = ctx.Queue(), ctx.Barrier(world_size)
    with tempfile.TemporaryDirectory() as d:
        init_file = os.path.join(d, "store")
        procs = [ctx.Process(target=_entry, args=(fn, r, world_size, init_file, queue, leave, args, backend, cuda, timeout),
                             daemon=True)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        results: dict[int, object] = {}
        failures = []
        try:
            deadline = time.monotonic() + timeout
            while len(results) < world_size:
                try:
                    rank, ok, out = queue.get(timeout=1.0)
                except queue_module.Empty:
                    dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                    if dead and queue.empty():
                        failures.append(f"rank(s) {dead} exited (codes {[procs[r].exitcode for r in dead]}) "
                                        f"without a result; finished: {sorted(results)}")
                        break
                    if time.monotonic() > deadline:
                        failures.append(f"ranks timed out after {timeout}s; finished: {sorted(results)}")
                        failures += _stacks_of_hung_ranks(init_file, world_size, results)
                        break
                    continue
                if ok:
                    results[rank] = pickle.loads(out)
                else:
                    failures.append(f"--- rank {rank} failed:\n{out}")
                    break  # the others may now hang in a collective: stop waiting
        finally:
            for p in procs:
                p.join(timeout=5 if not failures else 0.5)
                if p.is_alive():
                    p.kill()
                    p.join()
            _replay_output(init_file, world_size)
    if failures:
        raise AssertionError("\n".join(failures))
    return [results[r] for r in range(world_size)]
