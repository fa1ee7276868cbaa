"""Threads per worker: a resumed run must run like a fresh one on the same cores.

The cause found (see ``launch.WORKER_ENV``): libgomp's waiting threads spin unless told otherwise,
and whether they spin depended on the run's history (a fresh run's dense warm-up tipped libgomp
into throttled spinning; a resumed run did not): on shared cores the resumed run was 10-50 times
slower. The workers now get ``OMP_WAIT_POLICY=PASSIVE`` before torch is imported, and the default
thread count is the CPUs the process may use (Slurm's allocation included), so neither depends on
whether the run resumed."""
from __future__ import annotations

import os

import pytest

from sparsecomm.app import launch


def test_default_threads_share_the_affinity_mask_between_local_processes():
    cores = len(os.sched_getaffinity(0))
    assert launch.default_threads({}, 1) == cores
    assert launch.default_threads({}, 2) == max(1, cores // 2)
    assert launch.default_threads({}, 10 * cores) == 1


def test_default_threads_under_slurm_follow_the_allocation_not_the_host():
    cores = len(os.sched_getaffinity(0))
    # torchrun inside one Slurm task per node: the task's CPUs shared by its workers
    assert launch.default_threads({"SLURM_CPUS_PER_TASK": "2", "TORCHELASTIC_RUN_ID": "7"}, 2) == 1
    # one Slurm task per process (srun / submitit): the task's CPUs are the process's own
    assert launch.default_threads({"SLURM_CPUS_PER_TASK": "1"}, 4) == 1
    assert launch.default_threads({"SLURM_CPUS_PER_TASK": str(cores + 64)}, 1) == cores  # never above the mask
    assert launch.default_threads({"SLURM_CPUS_PER_TASK": "x"}, 1) == cores


@pytest.mark.slow  # starts 2 workers through the launcher
def test_our_workers_wait_passively_unless_the_user_chose(monkeypatch):
    """What each worker of our launcher has in its environment from its start (libgomp reads it
    when torch is imported), read inside the workers."""
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    cluster = {"nnodes": 1, "nproc_per_node": 2, "rdzv_endpoint": "localhost:0", "rdzv_id": None,
               "rdzv_backend": "c10d", "max_restarts": 0, "start_method": "spawn", "timeout_s": 60}
    plan = launch.Plan("launch", "bare", 1, 2)
    got = launch.launch_workers(cluster, plan, os.getenv, "OMP_WAIT_POLICY", run_id="threads")
    assert got == {0: "PASSIVE", 1: "PASSIVE"}
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's choice is kept
    assert launch.launch_workers(cluster, plan, os.getenv, "OMP_WAIT_POLICY", run_id="threads-user") == \
        {0: "ACTIVE", 1: "ACTIVE"}
