"""Per-rank step loop of the communication benchmark; torchrun starts one per rank inside the link.

    python -m torch.distributed.run --nproc_per_node N --master_addr 127.0.0.1 --master_port P \\
        benchmarks/worker.py SPEC.json

``SPEC.json`` (written by ``harness.launch``)::

    {"model": "mlp", "batch_size": 16, "warmup": 2, "steps": 5, "seed": 0, "lr": 1e-3,
     "threads": 1, "tx_path": "/sys/class/net/lo/statistics/tx_bytes", "out": "rows.json",
     "variants": [{"id": "dense", "kind": "dense"}, {"id": "sc-0.5%-bf16", "kind": "sparsecomm",
                  "density": 0.005, "wire": "bf16"}, ...]}

Variant kinds: ``floor`` (forward+backward of the bare model: no DDP, no optimizer), ``dense``
(DDP + AdamW), ``fp16`` (DDP ``fp16_compress_hook`` + AdamW), ``powersgd`` (``rank``; one bucket,
``start_powerSGD_iter=2``, ``orthogonalization_epsilon=1e-8``, + AdamW), ``sparsecomm``
(``density``, ``wire`` fp32/bf16, ``fused``; random mask + ``MaskedAdamW``).

Per variant, every rank builds the same model (same seed) and its own fixed batch, runs
``warmup`` steps, then ``steps`` timed steps between two barriers. Rank 0 reads the link's
``tx_bytes`` (the namespace's ``lo``: all ranks' traffic) right after the first barrier and
right after the second (multi-node, ``"ifaces": ["eth0", "lo"]`` in the spec: each node's local
rank 0 reads those interfaces' counters in its own namespace, summed over nodes), and writes
one row per finished variant to ``out`` (rewritten after each variant, so a crash keeps the rows
before it).

Payload counters ("ours"): every ``torch.distributed.all_reduce`` call is counted (tensor bytes)
during the timed steps, which covers the fp16, PowerSGD and sparsecomm hooks; plain DDP reduces
inside its C++ reducer, so its payload is the gradient bytes (exact: every parameter is in a
bucket). For sparsecomm the hook's own ``state.bytes_sent`` is reported as well.
"""
from __future__ import annotations

import gc
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsecomm
from sparsecomm.app.engine import StepEngine

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import workloads  # noqa: E402

# torch's PowerSGD hook on Gloo fails with more than one DDP bucket ("Received data size doesn't match
# expected size", or a hang); with a single bucket it works.
SINGLE_BUCKET_MB = 1 << 16


# --- measurement helpers -----------------------------------------------------------------------
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


def tensor_bytes(obj) -> int:
    """Bytes of all tensors inside nested dicts/lists/tuples."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def optimizer_state_bytes(opt) -> int:
    """Bytes of the optimizer's state tensors (moments; Adam's step counters are 4 bytes each)."""
    if opt is None:
        return 0
    return sum(tensor_bytes(st) for st in opt.state.values())


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


def _delta(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: b[k] - a[k] for k in a}


class TxReader:
    def __init__(self, path: str):
        self.path = path

    def __call__(self) -> int:
        with open(self.path) as f:
            return int(f.read().strip())


# --- one variant ---------------------------------------------------------------------------------
def baseline_ddp(model: nn.Module, hook: str | None = None, powersgd_rank: int | None = None):
    """DDP over ``model`` with a baseline's communication; returns (ddp, PowerSGD state or None).

    ``hook``: None (DDP's own all-reduce of every gradient byte, 25 MB buckets), ``"fp16"``
    (``fp16_compress_hook``: 2 bytes per gradient entry), ``"powersgd"`` (PowerSGD of rank
    ``powersgd_rank`` in one bucket, ``start_powerSGD_iter=2``, eps 1e-8, error feedback, warm start).
    BatchNorm buffers are not broadcast (they would add the same bytes to every method's rows).
    """
    bucket_mb = SINGLE_BUCKET_MB if hook == "powersgd" else 25
    ddp = DDP(model, bucket_cap_mb=bucket_mb, broadcast_buffers=False)
    state = None
    if hook == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif hook == "powersgd":
        state = powerSGD_hook.PowerSGDState(
            process_group=None, matrix_approximation_rank=int(powersgd_rank), start_powerSGD_iter=2,
            orthogonalization_epsilon=1e-8, use_error_feedback=True, warm_start=True)
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    elif hook is not None:
        raise ValueError(f"unknown baseline hook {hook!r}; use None, 'fp16' or 'powersgd'")
    return ddp, state


def build_variant(v: dict, model: nn.Module, lr: float):
    """Wrap ``model`` as variant ``v`` wants; returns (net, optimizer, hook_state, extra facts)."""
    kind = v["kind"]
    facts: dict = {}
    if kind == "floor":
        return model, None, None, facts
    if kind not in ("dense", "fp16", "powersgd", "sparsecomm"):
        raise ValueError(f"unknown variant kind {kind!r}")
    ddp, state = baseline_ddp(model, kind if kind in ("fp16", "powersgd") else None, v.get("rank"))
    if kind == "sparsecomm":
        mask = sparsecomm.random_mask(model, density=float(v["density"]), seed=0)
        wire = None if v.get("wire", "fp32") == "fp32" else v["wire"]
        state = sparsecomm.register_masked_allreduce(ddp, mask, wire_dtype=wire, fused=v.get("fused", True))
        opt = sparsecomm.MaskedAdamW(model, mask, lr=lr)
        facts["k"] = mask.num_selected
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
    return ddp, opt, state, facts


def hook_state_bytes(kind: str, state) -> int:
    """Memory the communication hook keeps between steps (PowerSGD: error feedback, P, Q;
    sparsecomm: its packing plans' int64 indices)."""
    if state is None:
        return 0
    if kind == "powersgd":
        return sum(tensor_bytes(getattr(state, a, {})) for a in ("error_dict", "p_memory_dict", "q_memory_dict"))
    plans = getattr(state, "_plans", {}) or {}
    return sum(tensor_bytes(getattr(p, "index", None)) for p in plans.values())


def run_variant(v: dict, spec: dict, counter: PayloadCounter, tx: TxReader, barrier_bytes: float,
                node_tx: NodeCounters | None = None, node_barrier: dict[str, float] | None = None) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    wl = workloads.get(spec["model"])
    gc.collect()
    reset_ok = reset_peak_rss()
    torch.manual_seed(spec["seed"])
    model = wl.build()
    model.train()
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    x, y = wl.batch(spec["batch_size"], torch.Generator().manual_seed(spec["seed"] * 1000 + rank))
    net, opt, state, facts = build_variant(v, model, spec["lr"])
    loss_fn = nn.CrossEntropyLoss()
    warmup = spec["warmup"] + (2 if v["kind"] == "powersgd" else 0)  # its first 2 steps are dense

    phases: dict[str, list[float]] = {}
    losses = []
    engine = StepEngine(lambda out, target: loss_fn(workloads.logits_of(out), target), times=phases)

    def step(record: bool):
        t0 = time.perf_counter()
        loss = engine.step(net, (x, y), opt)  # the app's step: forward, backward (DDP's hook), optimizer
        if not record:
            for k in phases:
                phases[k].pop()
        else:
            losses.append(float(loss))
        return time.perf_counter() - t0

    for _ in range(warmup):
        step(False)
    setup_peak = peak_rss_bytes() if reset_ok else None  # building, mask, first steps
    gc.collect()
    reset_ok = reset_ok and reset_peak_rss()  # from here: the steady state of the timed steps
    lib0 = state.bytes_sent if v["kind"] == "sparsecomm" else 0

    def read_counters():
        """Link bytes (rank 0, or per node), busy CPU s of the machine and of this process, wall clock."""
        return (tx() if rank == 0 and node_tx is None else 0, node_tx() if node_tx else {},
                busy_cpu_seconds(), time.process_time(), time.perf_counter())

    dist.barrier()
    tx0, n0, busy0, cpu0, wall0 = read_counters()
    counter.bytes = counter.calls = 0
    counter.active = True
    times = [step(True) for _ in range(spec["steps"])]
    counter.active = False
    dist.barrier()
    tx1, n1, busy1, cpu1, wall1 = read_counters()
    steps = spec["steps"]

    if v["kind"] == "dense":
        payload, source = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad), "grad bytes"
    elif v["kind"] == "floor":
        payload, source = 0, "none"
    else:
        payload, source = counter.bytes / steps, "all_reduce calls"
    mine = {
        "times": times, "phases": {k: statistics.median(t) for k, t in phases.items()},
        "peak_rss": peak_rss_bytes() if reset_ok else None, "setup_peak_rss": setup_peak, "payload": payload,
        "cpu_s": cpu1 - cpu0,
        "node_tx": _delta(n0, n1),
        "finite": all(map(lambda f: f == f and abs(f) != float("inf"), losses)),
    }
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine)
    per_step = [max(r["times"][i] for r in everyone) for i in range(steps)]
    if node_tx is not None:  # multi-node: every node's interfaces, all ranks' traffic
        node_bytes = {i: sum(r["node_tx"][i] for r in everyone) - node_barrier[i] for i in node_tx.ifaces}
        tx0, tx1, barrier_bytes = 0, sum(node_bytes.values()), 0.0
    row = {
        "variant": v["id"], "kind": v["kind"], "model": spec["model"], "params": n_params,
        "world_size": world, "batch_size": spec["batch_size"], "warmup": warmup, "steps": steps,
        "step_s": statistics.median(per_step), "step_s_all": per_step,
        "step_s_rank0": statistics.median(times),
        "phases_s": {k: max(r["phases"][k] for r in everyone) for k in phases},
        "wire_bytes_per_rank": max(0.0, (tx1 - tx0 - barrier_bytes) / world / steps),
        "tx_bytes_total": tx1 - tx0,
        "payload_bytes": max(r["payload"] for r in everyone), "payload_source": source,
        "peak_rss_bytes": max(r["peak_rss"] for r in everyone) if reset_ok else None,
        "setup_peak_rss_bytes": max(r["setup_peak_rss"] for r in everyone) if reset_ok else None,
        "opt_state_bytes": optimizer_state_bytes(opt),
        "hook_state_bytes": hook_state_bytes(v["kind"], state),
        "losses_finite": all(r["finite"] for r in everyone),
        "foreign_cpu_share": foreign_share(busy0, busy1, sum(r["cpu_s"] for r in everyone), wall1 - wall0),
        "all_reduce_calls_per_step": counter.calls / steps,
    }
    if node_tx is not None:
        row["nodes"] = world // int(os.environ.get("LOCAL_WORLD_SIZE", world))
        row["node_tx_bytes_per_step"] = {i: max(0.0, b / steps) for i, b in node_bytes.items()}
    row.update({k: v[k] for k in ("density", "wire", "rank", "fused") if k in v})
    row.update(facts)
    if v["kind"] == "sparsecomm":
        row["lib_bytes_sent"] = (state.bytes_sent - lib0) / steps
        row["density_actual"] = state.mask.density
    del net, opt, state, model
    gc.collect()
    return row


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
    d = _delta(a, node_tx())
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, d)
    return {i: sum(r[i] for r in everyone) / n for i in node_tx.ifaces}


def measure_runs(spec_path: str, jobs_of, progress) -> None:
    """A rank of an accuracy benchmark (time to accuracy, transfer): join, read the link's
    counters (the namespace's ``tx_path``, or with ``"ifaces"`` every node's, :class:`ClusterTx`:
    then the jobs must read ``tx`` on every rank) and a barrier's cost, then run ``jobs_of(spec, counter, tx, per_barrier)`` one by
    one, recorded under ``"runs"`` in the spec's ``out`` (``harness.record_each``)."""
    spec = harness.join(spec_path)
    counter = PayloadCounter()
    tx = ClusterTx(spec["ifaces"]) if spec.get("ifaces") else TxReader(spec["tx_path"])
    per_barrier = barrier_cost(tx)
    harness.record_each(spec["out"], "runs", per_barrier, jobs_of(spec, counter, tx, per_barrier), progress)


def main(spec_path: str) -> None:
    spec = harness.join(spec_path)
    counter = PayloadCounter()
    tx = TxReader(spec.get("tx_path", "/sys/class/net/lo/statistics/tx_bytes"))
    node_tx = NodeCounters(spec["ifaces"]) if spec.get("ifaces") else None
    node_barrier = node_barrier_cost(node_tx) if node_tx else None
    per_barrier = sum(node_barrier.values()) if node_tx else barrier_cost(tx)
    harness.record_each(spec["out"], "rows", per_barrier,
                (lambda v=v: run_variant(v, spec, counter, tx, per_barrier, node_tx, node_barrier)
                 for v in spec["variants"]),
                progress)


def progress(row: dict, seconds: float) -> str:
    """Rank 0's line after a variant: step time, bytes per rank per step, wall time in all."""
    return (f"{row['variant']:>16}: {row['step_s']:.3f} s/step, {row['wire_bytes_per_rank'] / 1e6:.3f} MB/rank/step "
            f"on the wire ({seconds:.1f} s)")


if __name__ == "__main__":
    main(sys.argv[1])
