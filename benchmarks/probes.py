"""What a rank measures besides time: the payload every ``all_reduce`` hands to Gloo
(bytes), the link's byte counters (a namespace's ``tx_bytes``, or every node's ``/proc/net/dev``),
peak RSS, the CPU share of other processes, a barrier's own bytes. The
meters (:mod:`benchmarks.meters`) read them inside the app's run.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist



class PayloadCounter:
    """Counts the bytes of every tensor handed to ``dist.all_reduce`` while ``active``."""

    def __init__(self):
        self.bytes = 0
        self.calls = 0
        self.active = False
        self._orig = dist.all_reduce

        def counting_all_reduce(tensor, *args, **kwargs):
            if self.active:
                self.bytes += tensor.numel() * tensor.element_size()
                self.calls += 1
            return self._orig(tensor, *args, **kwargs)

        dist.all_reduce = counting_all_reduce


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0); False where it cannot.

    Freed heap pages are handed back first (glibc ``malloc_trim``), so a variant's peak is not
    inflated by memory the previous variant freed but the allocator kept.
    """
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def busy_cpu_seconds() -> float | None:
    """CPU seconds used by every process on the machine so far (/proc/stat, first line)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def foreign_share(busy0, busy1, ours: float, wall: float) -> float | None:
    """Share of the machine's CPUs that processes other than our ranks used during a window.

    Timings on a shared machine are as good as its quiet; rows with a large share are marked.
    """
    if busy0 is None or busy1 is None or wall <= 0:
        return None
    return max(0.0, busy1 - busy0 - ours) / (wall * (os.cpu_count() or 1))


class NodeCounters:
    """Bytes sent per interface (``ifaces``, e.g. eth0 and lo) by this node, from this process's
    network namespace's ``/proc/net/dev``; read by each node's local rank 0 only (other ranks
    report 0), so a sum over all ranks is a sum over nodes (multi-node runs, boxlink.py)."""

    def __init__(self, ifaces: list[str]):
        self.ifaces = list(ifaces)
        self.leader = int(os.environ.get("LOCAL_RANK", "0")) == 0

    def __call__(self) -> dict[str, int]:
        if not self.leader:
            return {i: 0 for i in self.ifaces}
        with open("/proc/net/dev") as f:
            lines = f.read().splitlines()[2:]
        tx = {}
        for line in lines:
            name, _, rest = line.partition(":")
            if name.strip() in self.ifaces:
                tx[name.strip()] = int(rest.split()[8])
        return {i: tx.get(i, 0) for i in self.ifaces}


class ClusterTx:
    """Bytes every node has sent on ``ifaces`` (eth0: to other nodes; lo: inside the node), summed
    over nodes: each node's local rank 0 reads its counters (:class:`NodeCounters`), one int64
    all-reduce adds them up. A collective: every rank calls it at the same points (the accuracy
    workers on a multi-node link, ``"ifaces"`` in the spec)."""

    def __init__(self, ifaces: list[str]):
        self.node = NodeCounters(ifaces)

    def __call__(self) -> int:
        total = torch.tensor([sum(self.node().values())], dtype=torch.int64)
        dist.all_reduce(total)
        return int(total)


def delta(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: b[k] - a[k] for k in a}


class TxReader:
    def __init__(self, path: str):
        self.path = path

    def __call__(self) -> int:
        with open(self.path) as f:
            return int(f.read().strip())


def barrier_cost(tx, n: int = 8) -> float:
    """Bytes on the link per barrier (all ranks together), to subtract from a timed window.
    Every rank reads ``tx`` (a :class:`ClusterTx` is a collective)."""
    dist.barrier()
    a = tx()
    for _ in range(n):
        dist.barrier()
    b = tx()
    return (b - a) / n


def node_barrier_cost(node_tx: NodeCounters, n: int = 8) -> dict[str, float]:
    """Per interface, bytes all nodes send per barrier: the multi-node version of barrier_cost."""
    dist.barrier()
    a = node_tx()
    for _ in range(n):
        dist.barrier()
    d = delta(a, node_tx())
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, d)
    return {i: sum(r[i] for r in everyone) / n for i in node_tx.ifaces}
