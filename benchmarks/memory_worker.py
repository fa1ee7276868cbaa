"""One memory figure, measured in a fresh process: ``python -m benchmarks.memory_worker SPEC.json``.

:func:`worker` resets the kernel's peak-RSS counter, runs the row named by ``spec['what']`` and
returns the peak extra bytes above the model; the process prints it as one ``[memory] {json}`` line
for :mod:`benchmarks.memory_run`. The mask rows call the library on the 8-layer MLP it builds
(``random_mask``, ``fisher_mask``, the earlier concatenating top-k); the training rows are the app's
own run (:func:`app_row`: ``sparsecomm.app.trainer.run`` with a :class:`benchmarks.meters.MemoryMeter`),
with the ``comm=`` option, ``mask=`` kind and optimizer of the row.
"""
from __future__ import annotations

import gc
import json
import os
import resource
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from torch import nn

import sparsecomm
from benchmarks.meters import MemoryMeter
from sparsecomm.app import trainer
from sparsecomm.app.compose import compose_config
from sparsecomm.mask import Mask

MIB = 1 << 20
GIB = 1 << 30
LAYERS = 8
ROWS = ("random_mask", "fisher_mask", "concat", "ddp", "sparsecomm", "pipeline", "dense_bv")
# "dense" (DDP with torch's defaults, no gradient bucket view) is in earlier results only: the app's DDP
# always views its gradients in the buckets, and every training row is the app's run.
LABELS = {"random_mask": "random_mask", "fisher_mask": "fisher_mask", "concat": "concat top-k (before)",
          "ddp": "DDP + SGD without state (its buckets)", "sparsecomm": "DDP + hook + MaskedAdamW",
          "pipeline": "fisher_mask, then DDP + hook + MaskedAdamW", "dense": "dense DDP + AdamW",
          "dense_bv": "dense DDP (bucket view) + AdamW"}
TRAINING = ("ddp", "sparsecomm", "pipeline", "dense_bv")  # the app's runs
RECORDED = (*ROWS, "dense")  # the rows a results file may hold, in table order


def width_for(mib: float) -> int:
    """w such that 8 Linear(w, w) layers (weights + biases) hold about ``mib`` MiB of fp32."""
    w = int((mib * MIB / 4 / LAYERS) ** 0.5)
    return w - (w % 16)


def model_bytes(w: int) -> int:
    return LAYERS * (w * w + w) * 4


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakRSS:
    """Peak resident memory since :meth:`reset`, in bytes (Linux VmHWM, else getrusage's lifetime peak)."""

    def __init__(self):
        self.exact = False

    def reset(self) -> int:
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.exact = _status_kib("VmHWM") is not None
        except OSError:
            self.exact = False
        return self.current()

    @staticmethod
    def current() -> int:
        kib = _status_kib("VmRSS")
        if kib is not None:
            return kib * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def peak(self) -> int:
        kib = _status_kib("VmHWM") if self.exact else None
        return kib * 1024 if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _build(w: int, device):
    torch.manual_seed(0)
    with torch.device(device):
        model = nn.Sequential(*[nn.Linear(w, w) for _ in range(LAYERS)])
    return model


def _concat_random_mask(model, density: float, seed: int = 0):
    """The previous random_mask: n float64 scores, concatenated, compared whole (for the 'before' row)."""
    params = dict(model.named_parameters())
    k = round(density * sum(p.numel() for p in params.values()))
    gen = torch.Generator().manual_seed(seed)
    scores = {n: torch.rand(p.shape, generator=gen, dtype=torch.float64) for n, p in params.items()}
    flat = torch.cat([s.reshape(-1).to(torch.float64).cpu() for s in scores.values()])
    threshold = torch.topk(flat, k, sorted=True).values[-1]
    sel = flat > threshold
    ties = (flat == threshold).nonzero().reshape(-1)[:k - int(sel.sum())]
    sel[ties] = True
    bits, offset = {}, 0
    for n, s in scores.items():
        bits[n] = sel[offset:offset + s.numel()].reshape(s.shape)
        offset += s.numel()
    return Mask(bits)


def app_overrides(spec: dict) -> list[str]:
    """Row ``spec['what']`` as the app's run: ``task=synthetic`` with the 8-layer MLP of width w
    (``models.mlp`` with in = hidden = classes = w and 7 hidden layers: 8 x (w*w + w) entries, as
    :func:`model_bytes` counts), ``batch`` examples a step, ``steps`` steps; its ``comm=`` option,
    ``mask=`` kind (no entry kept whole: k = density x n) and optimizer."""
    w, steps, batch = int(spec["width"]), int(spec["steps"]), int(spec["batch"])
    run = ["task=synthetic", "task.model=mlp", f"task.in_features={w}", f"task.hidden={w}",
           f"task.depth={LAYERS - 1}", f"task.num_classes={w}", f"task.num_train={batch * steps}",
           f"task.num_test={batch}", f"batch_size={batch}", f"eval_batch_size={batch}", f"steps={steps}",
           "schedule=fish_fixed", "schedule/lr=constant", "eval_every=0", f"logging.log_every={steps}",
           "save_model=false", "save_diff=false", "seed=0", "comm.sync_buffers=false",
           f"cluster.num_threads={int(spec.get('threads', 1))}", f"cluster.device={spec.get('device', 'cpu')}"]
    sparse = [f"mask.density={spec['density']}", "mask.always=[]", "comm=masked", "optim.lr=1e-4"]
    return run + {
        "ddp": ["mask=dense", "comm=dense", "optim=sgd", "optim.dense_lr=1e-4", "optim.momentum=0.0"],
        "sparsecomm": ["mask=random", *sparse],
        "pipeline": ["mask=fisher", f"mask.num_samples={spec['fisher_samples']}", *sparse],
        "dense_bv": ["mask=dense", "comm=dense", "optim.dense_lr=1e-4"],
    }[spec["what"]]


def data_bytes(spec: dict) -> int:
    """The synthetic task's examples the run holds: (train + test) x (w fp32 inputs + an int64 label)."""
    w, batch = int(spec["width"]), int(spec["batch"])
    return (batch * int(spec["steps"]) + batch) * (4 * w + 8)


def app_row(spec: dict) -> dict:
    """A training row: the app's own run (``sparsecomm.app.trainer.run``); its peak less the model
    and the data it builds is the peak extra memory of training."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    rss = PeakRSS()
    rss_start = rss.current()
    if spec.get("warmup", True) and world == 1:  # one-time costs (libraries, Gloo, DDP, Hydra) out of the figure
        trainer.run(compose_config(app_overrides(dict(spec, width=64, fisher_samples=32))),
                    tempfile.mkdtemp(prefix="memwarm-"))
        gc.collect()
    base = rss.reset()
    held = model_bytes(int(spec["width"])) + data_bytes(spec)
    t0 = time.perf_counter()
    summary = trainer.run(compose_config(app_overrides(spec)), tempfile.mkdtemp(prefix="mem-"),
                          callbacks=[MemoryMeter(rss.peak)])
    mem = summary["memory"]
    phases = {k: v - base - held for k, v in mem["phases"].items()}
    return {"what": spec["what"], "width": int(spec["width"]), "model_bytes": model_bytes(int(spec["width"])),
            "rank": rank, "world": world, "steps": int(spec["steps"]), "rss_runtime": rss_start, "rss_before": base,
            "peak_exact": rss.exact, "k": summary["k"], "seconds": round(time.perf_counter() - t0, 2),
            "peak_extra": max(phases.values()), "phases": phases, "rss_peak_total": max(mem["phases"].values()),
            "data_bytes": data_bytes(spec), "optimizer_state_bytes": mem["opt_state_bytes"],
            "bytes_sent": summary["bytes_sent"], "loss_finite": mem["loss_finite"], "overrides": app_overrides(spec),
            "gradient_as_bucket_view": True}


def worker(spec: dict) -> dict:
    """Run one row (``spec['what']``) on a model of width ``spec['width']``; report peak extra bytes."""
    if spec["what"] in TRAINING:
        return app_row(spec)
    torch.set_num_threads(int(spec.get("threads", 1)))
    if not dist.is_initialized():
        if "RANK" in os.environ:
            dist.init_process_group("gloo")
        else:
            store = tempfile.NamedTemporaryFile(delete=False)
            dist.init_process_group("gloo", init_method=f"file://{store.name}", rank=0, world_size=1)
    device = torch.device(spec.get("device", "cpu"))
    cuda = device.type == "cuda"
    w, what, steps, density = int(spec["width"]), spec["what"], int(spec["steps"]), float(spec["density"])
    rank, world = dist.get_rank(), dist.get_world_size()
    rss = PeakRSS()
    rss_start = rss.current()
    if spec.get("warmup", True):  # one-time costs (libraries, thread pools, Gloo, DDP) out of the figure
        warm = dict(spec, width=64, warmup=False, fisher_samples=32, barrier=False)
        worker(warm)
        gc.collect()
    model = _build(w, device)
    g = torch.Generator().manual_seed(1 + rank)
    batch = (torch.randn(spec["batch"], w, generator=g).to(device),
             torch.randint(w, (spec["batch"],), generator=g).to(device))
    fisher_data = [(torch.randn(32, w, generator=g).to(device), torch.randint(w, (32,), generator=g).to(device))
                   for _ in range(max(1, spec["fisher_samples"] // 32 // world))]
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_dev = torch.cuda.memory_allocated()
    base = rss.reset()
    t0 = time.perf_counter()
    out = {"what": what, "width": w, "model_bytes": model_bytes(w), "rank": rank, "world": world, "steps": 0,
           "rss_runtime": rss_start, "rss_before": base, "peak_exact": rss.exact}
    phases = {}
    mask = None
    if what in ("random_mask", "concat"):
        mask = (sparsecomm.random_mask(model, density=density, seed=0) if what == "random_mask"
                else _concat_random_mask(model, density))
        out["k"] = mask.num_selected
    if what == "fisher_mask":
        mask = sparsecomm.fisher_mask(model, fisher_data, torch.nn.functional.cross_entropy, density=density,
                                      num_samples=spec["fisher_samples"], engine="layers")
        out["k"] = mask.num_selected
        phases["fisher_mask"] = rss.peak() - base
    out["seconds"] = round(time.perf_counter() - t0, 2)
    out["peak_extra"] = max([rss.peak() - base, *phases.values()])
    out["phases"] = phases
    if cuda:
        torch.cuda.synchronize()
        out["device_peak_extra"] = torch.cuda.max_memory_allocated() - base_dev
    out["rss_peak_total"] = base + out["peak_extra"]
    if spec.get("barrier", True):
        dist.barrier()
    return out


def _worker_main(path: str) -> None:
    with open(path) as f:
        spec = json.load(f)
    res = worker(spec)
    print("[memory] " + json.dumps(res), flush=True)


if __name__ == "__main__":
    _worker_main(sys.argv[1])
