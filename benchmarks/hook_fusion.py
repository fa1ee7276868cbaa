"""One fused all-reduce per step vs one per bucket, for the masked hook (``comm.fused``).

    python -m benchmarks.hook_fusion [--hidden 2048] [--density 0.005] [--bucket-cap-mb 4] [--steps 10]

Two Gloo ranks on this machine's loopback; each mode is one run of the app (:mod:`benchmarks.drive`:
``task=synthetic`` with an MLP of 6 ``hidden`` x ``hidden`` layers, ``comm=masked`` with
``comm.fused=true`` / ``false``, small buckets so that there are several). Prints the median backward
phase of a step (the hook's all-reduce runs inside it; slowest rank) and the ratio; writes
``benchmarks/results/hook_fusion.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

from benchmarks import harness, report
from cluster import netem

WARMUP = 2  # DDP rebuilds its buckets after the first step


def spec(a) -> dict:
    total = WARMUP + a.steps
    run = ["task=synthetic", "task.model=mlp", f"task.in_features={a.hidden}", f"task.hidden={a.hidden}",
           "task.depth=5", f"task.num_classes={a.hidden}", "task.num_test=8", "batch_size=4", "eval_batch_size=8",
           f"steps={total}", "schedule=fish_fixed", "eval_every=0", f"logging.log_every={total}", "save_model=false",
           "save_diff=false", "seed=0", "mask=random", f"mask.density={a.density}", "mask.always=[]", "comm=masked",
           f"comm.bucket_cap_mb={a.bucket_cap_mb}"]
    return {"model": "mlp", "meter": "steps", "variants": [
        {"id": f"fused={f}", "fused": f, "overrides": run + [f"comm.fused={str(f).lower()}"], "warmup": WARMUP,
         "steps": a.steps} for f in (True, False)]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048, help="width of the 6 square layers (2048: 25M entries)")
    ap.add_argument("--density", type=float, default=0.005)
    ap.add_argument("--bucket-cap-mb", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=report.RESULTS)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hook_fusion-") as workdir, \
            netem.Link("unshaped", isolate=False) as link:
        rows, failures = harness.launch(link, 2, spec(a), workdir=workdir, timeout=1800)
    if failures:
        raise SystemExit(f"hook_fusion: {'; '.join(f'{k}: {v}' for k, v in failures.items())}")
    by = {r["fused"]: r for r in rows}
    r = {"fused_s": by[True]["phases_s"]["backward"], "per_bucket_s": by[False]["phases_s"]["backward"],
         "calls_per_step": {"fused": by[True]["all_reduce_calls_per_step"],
                            "per_bucket": by[False]["all_reduce_calls_per_step"]},
         "k": by[True]["k"], "n": by[True]["params"]}
    r["fused_speedup"] = r["per_bucket_s"] / r["fused_s"]
    print(f"n={r['n']:,} k={r['k']:,} all-reduce calls per step: fused {r['calls_per_step']['fused']:g}, per bucket "
          f"{r['calls_per_step']['per_bucket']:g}; backward+hook median fused {r['fused_s'] * 1e3:.1f} ms, "
          f"per-bucket {r['per_bucket_s'] * 1e3:.1f} ms, per-bucket/fused = {r['fused_speedup']:.2f}x")
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "hook_fusion.json"), "w") as f:
        json.dump({"command": report.command_line(__file__, argv), "args": vars(a), **r}, f, indent=2)
    return r


if __name__ == "__main__":
    main()
