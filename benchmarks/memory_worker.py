"""One memory figure, measured in a fresh process: ``python -m benchmarks.memory_worker SPEC.json``.

:func:`worker` builds the 8-layer MLP, resets the kernel's peak-RSS counter, runs the row named by
``spec['what']`` (a mask, DDP + hook + optimizer steps, ...) and returns the peak extra bytes above the
model; the process prints it as one ``[memory] {json}`` line for :mod:`benchmarks.memory_run`.
"""
from __future__ import annotations

import gc
import json
import os
import resource
import sys
import tempfile
import time

MIB = 1 << 20
GIB = 1 << 30
LAYERS = 8
ROWS = ("random_mask", "fisher_mask", "concat", "ddp", "sparsecomm", "pipeline", "dense", "dense_bv")
LABELS = {"random_mask": "random_mask", "fisher_mask": "fisher_mask", "concat": "concat top-k (before)",
          "ddp": "DDP alone (its buckets)", "sparsecomm": "DDP + hook + MaskedAdamW",
          "pipeline": "fisher_mask, then DDP + hook + MaskedAdamW", "dense": "dense DDP + AdamW",
          "dense_bv": "dense DDP (bucket view) + AdamW"}
TRAINING = ("ddp", "sparsecomm", "pipeline", "dense", "dense_bv")


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
    import torch
    from torch import nn

    torch.manual_seed(0)
    with torch.device(device):
        model = nn.Sequential(*[nn.Linear(w, w) for _ in range(LAYERS)])
    return model


def _concat_random_mask(model, density: float, seed: int = 0):
    """The previous random_mask: n float64 scores, concatenated, compared whole (for the 'before' row)."""
    import torch

    from sparsecomm.mask import Mask

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


def _train(model, what: str, steps: int, density: float, batch, mask=None) -> dict:
    """DDP (+ hook + MaskedAdamW, or + AdamW) for ``steps`` steps. Returns what it held."""
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    import sparsecomm

    x, y = batch
    loss_fn = torch.nn.functional.cross_entropy
    bucket_view = what != "dense"
    ddp = DDP(model, gradient_as_bucket_view=bucket_view, broadcast_buffers=False)
    info = {"gradient_as_bucket_view": bucket_view}
    if what in ("sparsecomm", "pipeline"):
        if mask is None:
            mask = sparsecomm.random_mask(model, density=density, seed=0)
        state = sparsecomm.register_masked_allreduce(ddp, mask)
        opt = sparsecomm.MaskedAdamW(model, mask, lr=1e-4)
        info["k"] = mask.num_selected
    elif what in ("dense", "dense_bv"):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    else:
        opt = None
    for _ in range(steps):
        loss_fn(ddp(x), y).backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)
    if what in ("sparsecomm", "pipeline"):
        info["optimizer_state_bytes"] = opt.state_bytes()
        info["bytes_sent"] = state.bytes_sent
    elif opt is not None:
        info["optimizer_state_bytes"] = sum(v.numel() * v.element_size() for st in opt.state.values()
                                            for v in st.values() if isinstance(v, torch.Tensor))
    info["loss_finite"] = bool(torch.isfinite(loss_fn(model(x), y)))
    return info


def worker(spec: dict) -> dict:
    """Run one row (``spec['what']``) on a model of width ``spec['width']``; report peak extra bytes."""
    import torch
    import torch.distributed as dist

    import sparsecomm

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
    if what in ("fisher_mask", "pipeline"):
        mask = sparsecomm.fisher_mask(model, fisher_data, torch.nn.functional.cross_entropy, density=density,
                                      num_samples=spec["fisher_samples"], engine="layers")
        out["k"] = mask.num_selected
        phases["fisher_mask"] = rss.peak() - base
        if what == "pipeline":
            out["mask_bits_bytes"] = mask.numel  # 1 byte per entry
            rss.reset()  # the training phase's own peak, from the RSS it starts at (holding the mask)
            phases["train_start"] = rss.current() - base
    if what in TRAINING:
        out.update(_train(model, what, steps, density, batch, mask=mask))
        out["steps"] = steps
        phases["train"] = rss.peak() - base
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
