"""Run a function on N ranks in child processes (file:// store: ~0.1 s to start when forked).

    results = run_ranks(fn, world_size=2, arg1, ...)   # fn(rank, world_size, *args) -> picklable

Every rank's return value comes back in rank order; an exception on any rank fails the caller
with that rank's traceback. A rank that hangs is killed after ``timeout`` seconds.

A rank that dies without a result fails the caller at once; a rank still running at the timeout
writes every thread's stack, which the failure shows.

Gloo on forked CPU processes by default. For CUDA (tests/test_gpu.py): ``backend="nccl"`` or
Gloo with CUDA tensors, and ``start_method="spawn"`` (a forked child cannot use CUDA once the
parent has); each rank's current device is then ``cuda:(rank % device_count)``, set before
the process group starts. With spawn, ``fn`` must be importable (a module-level function).
"""
from __future__ import annotations

import contextlib
import faulthandler
import gc
import multiprocessing as mp
import os
import pickle
import queue as queue_module
import tempfile
import threading
import time
import traceback

import torch
import torch.distributed as dist


def _entry(fn, rank, world_size, init_file, queue, leave, args, backend="gloo", cuda=False, timeout=120.0):
    # a rank still running when the caller gives up writes where each of its threads is
    stacks = open(f"{init_file}.stacks.{rank}", "w")  # noqa: SIM115 - open until the process ends
    faulthandler.dump_traceback_later(max(timeout - 3, 1), exit=False, file=stacks)
    try:
        torch.set_num_threads(1)
        if cuda:
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        try:
            # plain pickle: torch's shared-memory reductions would die with this process
            out = pickle.dumps(fn(rank, world_size, *args))
        finally:
            gc.collect()  # DDP wrappers and their hooks sit in reference cycles: free them before their group
            dist.destroy_process_group()
        queue.put((rank, True, out))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, False, traceback.format_exc()))
    # Write the result out, and end only when every rank has written its own: DDP keeps its Gloo
    # group and threads alive past destroy_process_group, and a peer's exit can make those threads
    # abort this process (SIGABRT) before its result has left.
    queue.close()
    queue.join_thread()
    with contextlib.suppress(threading.BrokenBarrierError):
        leave.wait(timeout=30)
    os._exit(0)


def _stacks_of_hung_ranks(init_file: str, world_size: int, finished) -> list[str]:
    time.sleep(3.5)  # each rank writes its stacks 3 s before the caller's timeout
    found = []
    for rank in sorted(set(range(world_size)) - set(finished)):
        with contextlib.suppress(OSError), open(f"{init_file}.stacks.{rank}") as f:
            found.append(f"--- rank {rank}'s threads:\n{f.read()}")
    return found


def run_ranks(fn, world_size: int, *args, timeout: float = 120.0, backend: str = "gloo",
              start_method: str = "fork", cuda: bool = False):
    """``fn(rank, world_size, *args)`` on ``world_size`` ranks of ``backend``; their results in rank order.

    ``cuda=True``: every rank sets its current CUDA device first (use with ``start_method="spawn"``).
    """
    ctx = mp.get_context(start_method)
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
    if failures:
        raise AssertionError("\n".join(failures))
    return [results[r] for r in range(world_size)]
