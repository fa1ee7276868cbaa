"""The benchmarks' measurement callbacks: what they read from the app's own run, on every rank.

Each is a :class:`sparsecomm.app.callbacks.Callback`; the benchmark's driver (:mod:`benchmarks.drive`)
hands them to ``sparsecomm.app.trainer.run``. They change nothing in the run. What they add to the
network: :class:`StepMeter` one barrier before and one after its timed window (and 8 at the start, to
measure a barrier's own bytes), one ``all_gather_object`` of each rank's numbers at the end; the
multi-node link counter one int64 all-reduce per reading. Those bytes are outside the window or
subtracted from it.

    StepMeter(warmup, steps, link)  steps warmup+1 .. warmup+steps: step time (slowest rank), the
                                    forward / backward (with the all-reduce) / optimizer split, bytes
                                    on the link, payload handed to ``all_reduce``, the sync's own
                                    counter (``stats()``), peak RSS, other processes' CPU share
    AccuracyCurve(link)             every evaluation: step, training seconds, bytes on the link,
                                    test accuracy
    MemoryMeter(peak)               peak RSS after set-up, after the first step and over the run
"""
from __future__ import annotations

import gc
import os
import statistics
import time

import torch.distributed as dist

from benchmarks.probes import (ClusterTx, NodeCounters, PayloadCounter, TxReader, barrier_cost, busy_cpu_seconds,
                               delta, foreign_share, node_barrier_cost, peak_rss_bytes, reset_peak_rss)
from sparsecomm.app.callbacks import Callback
from sparsecomm.app.optimizers import optimizer_state_bytes  # the app's one optimizer-state counter

_PAYLOAD: list[PayloadCounter] = []  # one per process: it wraps dist.all_reduce once


def payload_counter() -> PayloadCounter:
    """This process's counter of the bytes handed to ``dist.all_reduce`` (installed on first use)."""
    if not _PAYLOAD:
        _PAYLOAD.append(PayloadCounter())
    return _PAYLOAD[0]


class Link:
    """The link's byte counter as the spec names it: ``tx_path`` (one namespace's ``lo``, read by
    rank 0) or ``ifaces`` (every node's interfaces, per node and in all)."""

    def __init__(self, spec: dict):
        self.ifaces = spec.get("ifaces")
        self.nodes = NodeCounters(self.ifaces) if self.ifaces else None
        self.tx = TxReader(spec.get("tx_path", "/sys/class/net/lo/statistics/tx_bytes"))
        self.per_barrier: float = 0.0
        self.node_barrier: dict[str, float] | None = None

    def measure_barrier(self) -> None:
        """The bytes of one barrier (collective), subtracted from every window."""
        if self.nodes is not None:
            self.node_barrier = node_barrier_cost(self.nodes)
            self.per_barrier = sum(self.node_barrier.values())
        else:
            self.per_barrier = barrier_cost(self.tx)

    def read(self) -> tuple[int, dict[str, int]]:
        """(rank 0's namespace counter or 0, this node's interfaces or {}); not a collective."""
        if self.nodes is not None:
            return 0, self.nodes()
        return (self.tx() if dist.get_rank() == 0 else 0), {}

    def total(self) -> int:
        """Bytes sent so far on the whole link (a collective on a multi-node link)."""
        return ClusterTx(self.ifaces)() if self.ifaces else self.tx()


class StepMeter(Callback):
    """Times steps ``warmup+1 .. warmup+steps`` and counts what crossed the link meanwhile; the
    row comes back in the summary under ``"bench"`` (the same on every rank)."""

    wants_step_times = True

    def __init__(self, warmup: int, steps: int, link: Link):
        self.warmup, self.steps, self.link = warmup, steps, link
        self.counter = payload_counter()
        self.walls: list[float] = []
        self.phases: dict[str, list[float]] = {}
        self.losses: list[float] = []
        self.window: dict = {}
        self.setup_peak = None
        self.reset_ok = False
        self._last = 0.0

    def on_train_start(self, state) -> None:
        self.link.measure_barrier()
        gc.collect()
        self.reset_ok = reset_peak_rss()
        if self.warmup == 0:
            self._open(state)

    def _read(self) -> dict:
        tx, nodes = self.link.read()
        return {"tx": tx, "nodes": nodes, "busy": busy_cpu_seconds(), "cpu": time.process_time(),
                "wall": time.perf_counter()}

    def _open(self, state) -> None:
        self.setup_peak = peak_rss_bytes() if self.reset_ok else None  # building, mask, first steps
        gc.collect()
        self.reset_ok = self.reset_ok and reset_peak_rss()  # from here: the steady state
        self.sent0 = state.sync.bytes_sent
        dist.barrier()
        self.window["start"] = self._read()
        self.counter.bytes = self.counter.calls = 0
        self.counter.active = True
        self._last = time.perf_counter()

    def on_step_end(self, state, step: int, loss, times) -> None:
        if self.warmup < step <= self.warmup + self.steps:
            now = time.perf_counter()
            self.walls.append(now - self._last)
            self._last = now
            for k, v in (times or {}).items():
                self.phases.setdefault(k, []).append(v)
            self.losses.append(float(loss))
        if step == self.warmup and step > 0:
            self._open(state)
        elif step == self.warmup + self.steps:
            self.counter.active = False
            self.sent = state.sync.bytes_sent - self.sent0
            dist.barrier()
            self.window["end"] = self._read()

    def on_train_end(self, state, summary) -> dict:
        a, b = self.window["start"], self.window["end"]
        mine = {"walls": self.walls, "phases": {k: statistics.median(v) for k, v in self.phases.items()},
                "peak": peak_rss_bytes() if self.reset_ok else None, "setup_peak": self.setup_peak,
                "payload": self.counter.bytes / self.steps, "calls": self.counter.calls / self.steps,
                "cpu_s": b["cpu"] - a["cpu"], "nodes": delta(a["nodes"], b["nodes"]),
                "finite": all(f == f and abs(f) != float("inf") for f in self.losses)}
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        world, steps = len(everyone), self.steps
        per_step = [max(r["walls"][i] for r in everyone) for i in range(steps)]
        tx = b["tx"] - a["tx"] - self.link.per_barrier
        row = {"world_size": world, "steps": steps, "warmup": self.warmup,
               "step_s": statistics.median(per_step), "step_s_all": per_step,
               "phases_s": {k: max(r["phases"][k] for r in everyone) for k in everyone[0]["phases"]},
               "wire_bytes_per_rank": max(0.0, tx / world / steps), "tx_bytes_total": b["tx"] - a["tx"],
               "all_reduce_payload_bytes": max(r["payload"] for r in everyone),
               "all_reduce_calls_per_step": everyone[0]["calls"],
               "sync_bytes_per_step": self.sent / steps,
               "peak_rss_bytes": max(r["peak"] for r in everyone) if self.reset_ok else None,
               "setup_peak_rss_bytes": max(r["setup_peak"] for r in everyone) if self.reset_ok else None,
               "opt_state_bytes": optimizer_state_bytes(state.optimizer(state.mask is None)[0]),
               "losses_finite": all(r["finite"] for r in everyone),
               "foreign_cpu_share": foreign_share(a["busy"], b["busy"], sum(r["cpu_s"] for r in everyone),
                                                  b["wall"] - a["wall"])}
        if self.link.nodes is not None:
            node_bytes = {i: sum(r["nodes"][i] for r in everyone) - self.link.node_barrier[i]
                          for i in self.link.ifaces}
            row["nodes"] = world // int(os.environ.get("LOCAL_WORLD_SIZE", world))
            row["node_tx_bytes_per_step"] = {i: max(0.0, v / steps) for i, v in node_bytes.items()}
            row["wire_bytes_per_rank"] = max(0.0, sum(node_bytes.values()) / world / steps)
        return {"bench": row}


class AccuracyCurve(Callback):
    """``(step, training seconds, bytes per rank on the link, the sync's payload, test accuracy)`` at
    every evaluation; the clock stops while the trainer evaluates. At the end: the optimizer state
    and the share of the machine's CPUs other processes used during the run."""

    def __init__(self, link: Link):
        self.link = link
        self.curve: list[dict] = []
        self.seconds = 0.0

    def on_train_start(self, state) -> None:
        self.link.measure_barrier()
        dist.barrier()
        self.tx0 = self.link.total()
        self.barriers = 0
        self.busy0, self.cpu0, self.wall0 = busy_cpu_seconds(), time.process_time(), time.perf_counter()
        self._t = time.perf_counter()

    def on_step_end(self, state, step: int, loss, times) -> None:
        now = time.perf_counter()
        self.seconds += now - self._t
        self._t = now

    def on_eval(self, state, step: int, result) -> None:
        dist.barrier()
        self.barriers += 1
        sent = self.link.total() - self.tx0 - self.barriers * self.link.per_barrier
        self.curve.append({"step": step, "seconds": self.seconds, "accuracy": result["test_acc"],
                           "wire_bytes_per_rank": max(0.0, sent / dist.get_world_size()),
                           "payload_bytes": state.sync.bytes_sent})
        self._t = time.perf_counter()

    def on_train_end(self, state, summary) -> dict:
        ours = [None] * dist.get_world_size()
        dist.all_gather_object(ours, time.process_time() - self.cpu0)
        busy1, wall = busy_cpu_seconds(), time.perf_counter() - self.wall0
        return {"accuracy": {"curve": self.curve, "others_cpu_share": foreign_share(self.busy0, busy1, sum(ours), wall),
                             "opt_state_bytes": optimizer_state_bytes(state.optimizer(state.mask is None)[0])}}


class MemoryMeter(Callback):
    """Peak resident memory of this process at three points of the run (bytes, Linux VmHWM, whose
    mark the caller resets before the run): ``setup`` (model, data, DDP, optimizer built),
    ``first_step`` (through the first step: the mask, for ``mask=fisher`` its scoring), ``train`` (the
    whole run); and the optimizer state the run ends with."""

    def __init__(self, peak):
        self.peak = peak  # () -> bytes: the high-water mark since the caller's reset
        self.phases: dict[str, int] = {}
        self.finite = True

    def on_train_start(self, state) -> None:
        self.phases["setup"] = self.peak()

    def on_step_end(self, state, step: int, loss, times) -> None:
        if "first_step" not in self.phases:
            self.phases["first_step"] = self.peak()
        f = float(loss)
        self.finite = self.finite and f == f and abs(f) != float("inf")

    def on_train_end(self, state, summary) -> dict:
        self.phases["train"] = self.peak()
        return {"memory": {"phases": dict(self.phases), "loss_finite": self.finite,
                           "opt_state_bytes": optimizer_state_bytes(state.optimizer(state.mask is None)[0])}}
