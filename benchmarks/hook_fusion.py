"""One fused all-reduce per step vs one per bucket, for the masked hook (issue 2).

    python -m benchmarks.hook_fusion [--params 25e6] [--density 0.005] [--bucket-cap-mb 4] [--steps 12]

Two Gloo ranks on this machine (forked, file:// store). Both modes run in the SAME processes,
alternating, so machine noise hits both alike. Prints the median backward+hook time per step
and the ratio; writes benchmarks/results/hook_fusion.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsecomm  # noqa: E402
from multirank import run_ranks  # noqa: E402


def mlp(params: float) -> nn.Module:
    width = int((params / 6) ** 0.5)  # 6 square layers
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(width, width), nn.ReLU())])


def worker(rank, world, params, density, cap, steps):
    model = mlp(params)
    mask = sparsecomm.random_mask(model, density=density, seed=0)
    width = model[0].in_features
    times = {}
    for fused in (True, False):
        ddp = DDP(model, bucket_cap_mb=cap)
        state = sparsecomm.register_masked_allreduce(ddp, mask, fused=fused)
        times[fused] = []
        x = torch.randn(4, width)
        for step in range(steps):
            ddp.zero_grad()
            out = ddp(x).square().mean()
            torch.distributed.barrier()
            t0 = time.perf_counter()
            out.backward()
            times[fused].append(time.perf_counter() - t0)
        times[fused] = times[fused][2:]  # after the bucket rebuild
        buckets = len(state._plans)
    return {"fused_s": statistics.median(times[True]), "per_bucket_s": statistics.median(times[False]),
            "buckets": buckets, "k": mask.num_selected, "n": mask.numel}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=25e6)
    ap.add_argument("--density", type=float, default=0.005)
    ap.add_argument("--bucket-cap-mb", type=float, default=4.0)
    ap.add_argument("--steps", type=int, default=12)
    a = ap.parse_args()
    r = run_ranks(worker, 2, a.params, a.density, a.bucket_cap_mb, a.steps, timeout=1800)[0]
    r["fused_speedup"] = r["per_bucket_s"] / r["fused_s"]
    print(f"n={r['n']:,} k={r['k']:,} buckets={r['buckets']}: backward+hook median "
          f"fused {r['fused_s'] * 1e3:.1f} ms, per-bucket {r['per_bucket_s'] * 1e3:.1f} ms, "
          f"per-bucket/fused = {r['fused_speedup']:.2f}x")
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    with open(os.path.join(os.path.dirname(__file__), "results", "hook_fusion.json"), "w") as f:
        json.dump({"args": vars(a), **r}, f, indent=2)


if __name__ == "__main__":
    main()
