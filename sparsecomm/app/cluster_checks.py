"""Does the cluster config fit this machine: its GPUs, and inside a Slurm job what Slurm gave this node.

Read by the ``cluster`` options' own check (:class:`sparsecomm.app.schema.ClusterConfig`) before any
rank starts, and by the launcher (:mod:`sparsecomm.app.launch`) on every node. Errors are
:class:`~sparsecomm.app.fields.ClusterError` lines naming the field and the fix. Nothing crosses the network.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from .fields import ClusterError, check_choice, whole_number

BACKENDS = ("gloo", "nccl", "mpi")
DEVICES = ("cpu", "cuda")
START_METHODS = ("spawn", "fork", "forkserver")


def visible_gpus(field: str, value: Any) -> int:
    """How many GPUs torch sees; :class:`ClusterError` naming ``field`` if none."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        fix = ("set cluster.nproc_per_node=N or use cluster=local_cpu" if field == "cluster.nproc_per_node" else
               "use cluster=local_cpu (or cluster.backend=gloo cluster.device=cpu)")
        what = "counts GPUs, and torch sees none" if value == "auto" else \
            "needs CUDA GPUs, but torch sees none on this machine"
        raise ClusterError(f"{field}={value} {what}; {fix}")
    return n


def _count(environ: Mapping[str, str], key: str) -> int | None:
    value = str(environ.get(key, "")).split("(")[0]  # SLURM_CPUS_ON_NODE may read "4(x2)"
    return int(value) if value.isdigit() else None


def check_slurm_allocation(cluster: Mapping, environ: Mapping[str, str]) -> None:
    """Inside a Slurm job: the GPUs the config needs against those Slurm gave this node, named.

    (A job whose request no node can satisfy never starts, so nothing here can see it: ``sinfo -o
    "%N %c %G"`` lists what the nodes have.)"""
    job = environ.get("SLURM_JOB_ID")
    if not job:
        return
    gpus = _count(environ, "SLURM_GPUS_ON_NODE")
    if gpus is None and environ.get("CUDA_VISIBLE_DEVICES"):
        gpus = len([d for d in environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()])
    if cluster["backend"] == "nccl" or cluster["device"] == "cuda":
        field, value = ("cluster.backend", "nccl") if cluster["backend"] == "nccl" else ("cluster.device", "cuda")
        if not gpus:
            raise ClusterError(f"{field}={value} needs GPUs, but Slurm job {job} has none on this node "
                               f"(SLURM_GPUS_ON_NODE unset); submit with --gpus-per-node=N, or use "
                               f"cluster.backend=gloo cluster.device=cpu")
        nproc = cluster["nproc_per_node"]
        if str(nproc).isdigit() and int(nproc) > gpus:
            raise ClusterError(f"cluster.nproc_per_node={nproc} workers on {field}={value}, but Slurm job {job} has "
                               f"{gpus} GPU(s) on this node; submit with --gpus-per-node={nproc} or set "
                               f"cluster.nproc_per_node={gpus}")


def check_cluster(cluster: Mapping) -> None:
    """A cluster config this machine can run: choices, counts, GPUs for nccl/cuda."""
    for key, choices in (("backend", BACKENDS), ("device", DEVICES), ("start_method", START_METHODS)):
        check_choice(cluster.get(key), f"cluster.{key}", choices, error=ClusterError)
    whole_number(cluster["nnodes"], "cluster.nnodes", 1, ClusterError)
    check_slurm_allocation(cluster, os.environ)
    if cluster["backend"] == "nccl" or cluster["device"] == "cuda":
        field, value = ("cluster.backend", "nccl") if cluster["backend"] == "nccl" else ("cluster.device", "cuda")
        visible_gpus(field, value)
    nproc = cluster["nproc_per_node"]
    if str(nproc) == "auto":
        visible_gpus("cluster.nproc_per_node", "auto")
    else:
        whole_number(nproc, "cluster.nproc_per_node", 1, ClusterError)
