"""Start the workers, or join the world a launcher started (config group ``cluster/``).

A process running the app is in one of three situations, told apart by its environment:

* ``join`` from torchrun (or any elastic agent, including ours): ``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` are set. Nothing is started.
* ``join`` from Slurm, one task per process (``srun`` without torchrun, the submitit launcher):
  ``SLURM_PROCID`` and ``SLURM_NTASKS`` > 1 are set; :func:`export_slurm_env` turns them into
  the variables above (head node from ``scontrol``), as submitit's
  ``TorchDistributedEnvironment().export()`` does. Nothing is started.
* bare (``sparsecomm-train`` typed at a shell): :func:`launch_workers` starts
  ``cluster.nproc_per_node`` workers on this node with torch's elastic launch API (c10d
  rendezvous), or, for a world of one process, the run happens in place.

:func:`init_process_group` is what every worker calls: backend and device per ``cluster``.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from .config import ClusterError, check_cluster, visible_gpus
from .signals import Interrupted
from .fields import whole_number
from .netif import configure as configure_socket_ifname
from .peers import PEER_LOST_RECORD, PeerLost
from .peers import timeout as peer_timeout

ERROR_DIR_ENV = "SPARSECOMM_ERROR_DIR"  # set for our own workers: where they leave a one-line error

# The environment our launcher gives its workers unless the user set these (cluster/*.sh export the
# same). OMP_WAIT_POLICY=PASSIVE: an OpenMP thread that waits for work sleeps instead of spinning.
# libgomp spins by default (~300k iterations after every parallel region) unless it counts more
# of its threads than CPUs; where ranks share cores (several per node, the cluster box's nodes on
# one host, a busy machine) the spinning threads take the CPU from the working ones. Measured: a
# run resumed in the masked phase took 1.5-3 steps/s against 30-60 for the fresh run on the same
# cores; the fresh run was fast only by accident (the dense warm-up's full-bucket all-reduce runs
# a parallel op in a Gloo thread, a second OpenMP team, which tips libgomp into throttled
# spinning; a resumed run never sends a full bucket). With PASSIVE both run at the fresh speed.
# libgomp reads it once, when torch is imported: it must be in the worker's environment.
WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}

# What every worker imports before its first step (DDP's constructor imports torch._dynamo, ~2 s of
# CPU). With ``cluster.start_method=forkserver`` (cluster=local_cpu's) one server process imports
# them, the entry point's module and the task's, and forks each worker from there: N workers cost
# one import instead of N. The server keeps the environment it started with, so only a process's
# first launch uses it; a later launch of the same process (a sweep's next job, a second in-process
# run) spawns, and its workers see the environment as it is then (:func:`_start_method`).
WORKER_IMPORTS = ("torch", "torch.distributed", "torch.nn.parallel", "torch._dynamo")
_launched = False  # a launch of this process started its workers already


class WorkerUserError(ValueError):
    """A worker stopped on a user error (bad config, missing data); ``str`` is its one-line message."""


class WorkerFailed(RuntimeError):
    """A worker died of something other than a user error (its traceback is in its output)."""


@dataclass(frozen=True)
class Plan:
    """How this process takes part: ``mode`` join | single | launch, ``source`` of the ranks."""

    mode: str
    source: str
    nnodes: int
    nproc_per_node: int

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node


def resolve_nproc(cluster: Mapping) -> int:
    """``cluster.nproc_per_node`` as a number; ``auto`` is one per visible GPU."""
    n = cluster["nproc_per_node"]
    if str(n) == "auto":
        return visible_gpus("cluster.nproc_per_node", "auto")
    return whole_number(n, "cluster.nproc_per_node", 1, ClusterError)


def _slurm_world(environ: Mapping[str, str]) -> int:
    try:
        return int(environ.get("SLURM_NTASKS", "1"))
    except ValueError:
        return 1


def env_rank(environ: Mapping[str, str] | None = None) -> int | None:
    """This process's global rank if a launcher (torchrun, Slurm) set one, else ``None``."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return int(environ["RANK"])
    if "SLURM_PROCID" in environ and _slurm_world(environ) > 1:
        return int(environ["SLURM_PROCID"])
    return None


def plan(cluster: Mapping, environ: Mapping[str, str] | None = None) -> Plan:
    """Decide join / single / launch from the environment and ``cluster`` (see module doc)."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        world = int(environ["WORLD_SIZE"])
        local = int(environ.get("LOCAL_WORLD_SIZE", world))
        return Plan("join", "torchrun", max(world // max(local, 1), 1), local)
    if "SLURM_PROCID" in environ and _slurm_world(environ) > 1:
        world = _slurm_world(environ)
        nnodes = int(environ.get("SLURM_NNODES", "1"))
        return Plan("join", "slurm", nnodes, max(world // nnodes, 1))
    nnodes = whole_number(cluster["nnodes"], "cluster.nnodes", 1, ClusterError)
    nproc = resolve_nproc(cluster)
    return Plan("single" if nnodes * nproc == 1 else "launch", "bare", nnodes, nproc)


def slurm_head_node(environ: Mapping[str, str] | None = None) -> str:
    """First host of ``SLURM_JOB_NODELIST`` per ``scontrol``; never a silent localhost fallback."""
    environ = os.environ if environ is None else environ
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist:
        raise ClusterError("SLURM_JOB_NODELIST is not set: cannot find the head node for the rendezvous")
    if shutil.which("scontrol") is None:
        raise ClusterError(
            "scontrol is not on PATH: cannot find the head node of SLURM_JOB_NODELIST; run inside the "
            "Slurm job (or export MASTER_ADDR yourself)")
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=False)
    hosts = out.stdout.split()
    if out.returncode != 0 or not hosts:
        raise ClusterError(f"scontrol show hostnames {nodelist} failed: {out.stderr.strip() or 'no host'}")
    return hosts[0]


def export_slurm_env(cluster: Mapping, environ: dict | None = None) -> None:
    """Set RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT from SLURM_*.

    For one Slurm task per process (srun without torchrun, hydra's submitit launcher). The port
    is ``cluster.master_port``, or derived from the job id so two jobs on a node do not collide.
    """
    env = os.environ if environ is None else environ
    world = _slurm_world(env)
    nnodes = int(env.get("SLURM_NNODES", "1"))
    env.setdefault("RANK", env["SLURM_PROCID"])
    env.setdefault("WORLD_SIZE", str(world))
    env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
    env.setdefault("LOCAL_WORLD_SIZE", str(max(world // nnodes, 1)))
    if "MASTER_ADDR" not in env:
        env["MASTER_ADDR"] = slurm_head_node(env)
    if "MASTER_PORT" not in env:
        port = cluster.get("master_port")
        if port is None:
            port = 20000 + int(env.get("SLURM_JOB_ID", "0") or 0) % 20000
        env["MASTER_PORT"] = str(port)


def init_process_group(cluster: Mapping):
    """Join the default process group per ``cluster``; returns this rank's torch device.

    Uses ``env://`` when a launcher set the variables, else a one-process world in memory.
    Threads per process: ``cluster.num_threads`` or this node's cores / local processes. Every
    collective and the store's connection wait at most ``cluster.timeout_s`` (:mod:`.peers`).
    """
    check_cluster(cluster)
    environ = os.environ
    if "RANK" not in environ and "SLURM_PROCID" in environ and _slurm_world(environ) > 1:
        export_slurm_env(cluster)
    configure_socket_ifname(cluster, environ)  # GLOO/NCCL_SOCKET_IFNAME: cluster.socket_ifname or a safe pick
    backend = cluster["backend"]
    local_rank = int(environ.get("LOCAL_RANK", 0))
    local_world = int(environ.get("LOCAL_WORLD_SIZE", 1))
    threads = cluster["num_threads"]
    if threads is None:
        threads = default_threads(environ, local_world)
    torch.set_num_threads(int(threads))
    if cluster["device"] == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ClusterError(
                f"local rank {local_rank} has no GPU: torch sees {torch.cuda.device_count()}; set "
                f"cluster.nproc_per_node to at most the GPU count")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        device_id = device if device.type == "cuda" else None
        limit = peer_timeout(cluster)  # every wait on a peer, the store's connection included
        if backend == "nccl":  # read when the NCCL group is made: its watchdog ends a rank past the timeout
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
        if "RANK" in environ and environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            dist.init_process_group(backend, store=elastic_attempt_store(environ, limit), rank=int(environ["RANK"]),
                                    world_size=int(environ["WORLD_SIZE"]), device_id=device_id, timeout=limit)
        elif "RANK" in environ:
            dist.init_process_group(backend, init_method="env://", device_id=device_id, timeout=limit)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=limit)
    return device


def default_threads(environ: Mapping[str, str], local_world: int) -> int:
    """torch threads per process when ``cluster.num_threads`` is null: this process's share of the CPUs
    it may use. Under Slurm those are the task's (``SLURM_CPUS_PER_TASK``, shared by the workers
    torchrun starts in the task; a task per process keeps them all), never more than its affinity
    mask; elsewhere the mask's CPUs shared by the local processes. More threads than CPUs is what
    makes OpenMP's waiting threads take the CPU from the working ones (see :data:`WORKER_ENV`)."""
    cores = len(os.sched_getaffinity(0))
    share = max(local_world, 1)
    slurm = str(environ.get("SLURM_CPUS_PER_TASK", ""))
    if slurm.isdigit() and int(slurm) > 0:
        cores = min(cores, int(slurm))
        if "TORCHELASTIC_RUN_ID" not in environ:  # one Slurm task per process: the task's CPUs are its own
            share = 1
    return max(1, cores // share)


def elastic_attempt_store(environ: Mapping[str, str], timeout: timedelta = timedelta(minutes=5)):
    """The torch elastic agent's shared store, under a prefix per restart attempt.

    torchrun's c10d rendezvous hands every restart attempt the SAME TCPStore server (the agent's,
    ``TORCHELASTIC_USE_AGENT_STORE=True``) and ``env://`` adds no per-attempt prefix: restarted
    ranks can read the previous attempt's Gloo addresses and fail with "connectFullMesh ...
    Connection refused" (pytorch/pytorch#135712). Keys here live under
    ``sparsecomm/attempt-<TORCHELASTIC_RESTART_COUNT>/``: consistent on one node, where one agent
    restarts every worker. Across nodes restart counts can differ: export
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` for torchrun there (a fresh store per attempt).
    """
    store = dist.TCPStore(host_name=environ["MASTER_ADDR"], port=int(environ["MASTER_PORT"]),
                          world_size=int(environ["WORLD_SIZE"]), is_master=False, timeout=timeout)
    return dist.PrefixStore(f"sparsecomm/attempt-{environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


@contextlib.contextmanager
def _quiet_elastic_logs():
    """Silence torch elastic's own log lines while we launch (we report failures ourselves).

    ``LOGLEVEL`` in the environment (torch's convention) turns them back on.
    """
    if "LOGLEVEL" in os.environ:
        yield
        return
    names = [n for n in logging.root.manager.loggerDict
             if n.startswith(("torch.distributed.elastic", "torch.distributed.launcher", "torch.multiprocessing"))]
    saved = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)


def _start_method(wanted: str, preload: Sequence[str]) -> str:
    """The start method of this launch: ``wanted``, except a forkserver after the process's first
    launch (see :data:`WORKER_IMPORTS`); the forkserver's imports set on first use."""
    global _launched
    first, _launched = not _launched, True
    if wanted != "forkserver":
        return wanted
    if not first:
        return "spawn"
    multiprocessing.set_forkserver_preload([*WORKER_IMPORTS, *preload])
    return "forkserver"


def launch_config(cluster: Mapping, plan_: Plan, run_id: str | None = None):
    """torch's ``LaunchConfig`` for this node: c10d rendezvous per ``cluster``."""
    endpoint = cluster["rdzv_endpoint"] or "localhost:0"
    rdzv_id = cluster["rdzv_id"] or run_id
    if plan_.nnodes > 1:
        host, _, port = str(endpoint).rpartition(":")
        if host in ("", "localhost", "127.0.0.1") or port in ("", "0"):
            raise ClusterError(
                f"cluster.rdzv_endpoint={endpoint!r}: with cluster.nnodes={plan_.nnodes} every node must "
                f"reach the same rendezvous; set it to <head node host>:<port>, e.g. node001:29500")
        if not cluster["rdzv_id"]:
            raise ClusterError(
                f"cluster.rdzv_id is not set: with cluster.nnodes={plan_.nnodes} all nodes must pass the "
                f"same run id, e.g. cluster.rdzv_id=$SLURM_JOB_ID")
    return LaunchConfig(
        min_nodes=plan_.nnodes, max_nodes=plan_.nnodes, nproc_per_node=plan_.nproc_per_node,
        run_id=str(rdzv_id or uuid.uuid4().hex), rdzv_backend=str(cluster["rdzv_backend"]),
        rdzv_endpoint=str(endpoint), max_restarts=int(cluster["max_restarts"]),
        monitor_interval=0.1, start_method=str(cluster["start_method"]),
        rdzv_configs={"join_timeout": max(int(peer_timeout(cluster).total_seconds()), 1)})


def launch_workers(cluster: Mapping, plan_: Plan, entrypoint: Callable, *args: Any,
                   run_id: str | None = None, preload: Sequence[str] = ()) -> dict[int, Any]:
    """Run ``entrypoint(*args)`` in ``plan_.nproc_per_node`` workers here; their results by rank.

    ``preload``: modules a forkserver imports for the workers beyond :data:`WORKER_IMPORTS` and
    ``entrypoint``'s module (the task's); only those that import without side effects.

    A worker that stops on a user error leaves its one-line message in
    ``$SPARSECOMM_ERROR_DIR/rank<N>`` (:func:`record_worker_error`); the lowest rank's is raised
    here as :class:`WorkerUserError`, so the parent prints one line. Any other failure raises
    :class:`WorkerFailed` with torch elastic's report; a worker's lost peer, as :class:`.peers.PeerLost`.
    SIGINT/SIGTERM/SIGHUP/SIGQUIT to this process: torch's agent passes the signal on to the
    workers, which stop at a step boundary (writing a checkpoint if checkpoints are on, :class:`sparsecomm.app.signals.StopOnSignal`) within the agent's
    shutdown timeout; their line comes back as :class:`sparsecomm.app.signals.Interrupted`.
    """
    config = launch_config(cluster, plan_, run_id)
    config.start_method = _start_method(config.start_method, [entrypoint.__module__, *preload])
    # For this launch only: what the workers inherit (see WORKER_ENV) and, across nodes, a fresh
    # rendezvous store per restart attempt (see elastic_attempt_store), read by our agent. On one node
    # the agent's own store serves every attempt under its own prefix: a fresh store would listen on a
    # port the agent chose by binding port 0 and closing it, and another process on the host (a second
    # job's store) can take that port in between.
    fresh_store = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"} if plan_.nnodes > 1 else {}
    with _environ_defaults({**WORKER_ENV, **fresh_store}), \
            tempfile.TemporaryDirectory(prefix="sparsecomm-errors-") as errors:
        os.environ[ERROR_DIR_ENV] = errors
        try:
            with _quiet_elastic_logs():
                return elastic_launch(config, entrypoint)(*args)
        except ChildFailedError as e:
            messages = read_worker_errors(errors)
            if messages:
                first = messages[min(messages)]
                if first.startswith(PEER_LOST_RECORD):
                    raise PeerLost(first.removeprefix(PEER_LOST_RECORD)) from None
                raise WorkerUserError(first) from None
            raise WorkerFailed(e.format_msg()) from None
        except SignalException as e:
            messages = read_worker_errors(errors)
            line = messages[min(messages)] if messages else (
                f"interrupted by {e.sigval.name} before any worker reached a step boundary to stop at (the "
                f"workers were starting, or torch's shutdown timeout ended them first)")
            raise Interrupted(line.removeprefix("sparsecomm: "), int(e.sigval)) from None
        finally:
            os.environ.pop(ERROR_DIR_ENV, None)


@contextlib.contextmanager
def _environ_defaults(values: Mapping[str, str]):
    """``os.environ.setdefault`` for each of ``values``, undone when the block ends."""
    added = [key for key in values if key not in os.environ]
    os.environ.update({key: values[key] for key in added})
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def record_worker_error(message: str) -> bool:
    """In a worker of :func:`launch_workers`: leave ``message`` for the parent. False elsewhere."""
    errors = os.environ.get(ERROR_DIR_ENV)
    if not errors or not os.path.isdir(errors):
        return False
    rank = os.environ.get("RANK", "0")
    with open(os.path.join(errors, f"rank{rank}"), "w") as f:
        f.write(message)
    return True


def read_worker_errors(errors: str) -> dict[int, str]:
    out = {}
    for name in os.listdir(errors):
        if name.startswith("rank"):
            with open(os.path.join(errors, name)) as f:
                out[int(name[4:])] = f.read().strip()
    return out
