"""Run a function on N ranks in child processes (file:// store: ~0.1 s to start when forked).

    results = run_ranks(fn, world_size=2, arg1, ...)   # fn(rank, world_size, *args) -> picklable

Every rank's return value comes back in rank order; an exception on any rank fails the caller
with that rank's traceback. A rank that hangs is killed after ``timeout`` seconds.

Gloo on forked CPU processes by default. For CUDA (tests/test_gpu.py): ``backend="nccl"`` or
Gloo with CUDA tensors, and ``start_method="spawn"`` (a forked child cannot use CUDA once the
parent has); each rank's current device is then ``cuda:(rank % device_count)``, set before
the process group starts. With spawn, ``fn`` must be importable (a module-level function).
"""
from __future__ import annotations

import faulthandler
import gc
import multiprocessing as mp
import os
import pickle
import tempfile
import traceback

import torch
import torch.distributed as dist


def _entry(fn, rank, world_size, init_file, queue, args, backend="gloo", cuda=False, timeout=120.0):
    # a rank still running when the caller gives up prints where each of its threads is
    faulthandler.dump_traceback_later(max(timeout - 3, 1), exit=False)
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


def run_ranks(fn, world_size: int, *args, timeout: float = 120.0, backend: str = "gloo",
              start_method: str = "fork", cuda: bool = False):
    """``fn(rank, world_size, *args)`` on ``world_size`` ranks of ``backend``; their results in rank order.

    ``cuda=True``: every rank sets its current CUDA device first (use with ``start_method="spawn"``).
    """
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload(["torch", "torch.distributed", "sparsecomm", "pytest", "multirank"])
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        init_file = os.path.join(d, "store")
        procs = [ctx.Process(target=_entry, args=(fn, r, world_size, init_file, queue, args, backend, cuda, timeout),
                             daemon=True)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        results: dict[int, object] = {}
        failures = []
        try:
            for _ in range(world_size):
                rank, ok, out = queue.get(timeout=timeout)
                if ok:
                    results[rank] = pickle.loads(out)
                else:
                    failures.append(f"--- rank {rank} failed:\n{out}")
                    break  # the others may now hang in a collective: stop waiting
        except Exception as e:  # queue.Empty on timeout
            failures.append(f"ranks timed out after {timeout}s ({type(e).__name__}); finished: {sorted(results)}")
        finally:
            for p in procs:
                p.join(timeout=5 if not failures else 0.5)
                if p.is_alive():
                    p.kill()
                    p.join()
    if failures:
        raise AssertionError("\n".join(failures))
    return [results[r] for r in range(world_size)]
