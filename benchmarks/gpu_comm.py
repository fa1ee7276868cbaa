"""A short NCCL benchmark on the GPUs of one machine: step time and bytes handed to all-reduce,
dense DDP (``comm=dense``) against the masked all-reduce hook (``comm=masked``, fp32 and bf16 wire)
with ``MaskedAdamW``: each variant is one run of the app (:mod:`benchmarks.drive`).

    python -m benchmarks.gpu_comm [--ranks 1] [--model mlp] [--steps 20] [--density 0.005]
    python -m benchmarks.gpu_comm --device cpu --ranks 2 --model tiny      # a dry run, Gloo

One rank per GPU (``cluster.device=cuda``, NCCL); with one GPU the world has one rank, so NCCL's
all-reduce is local and the numbers measure the hook's CUDA path (packing, casts, the fused
all-reduce), not a network. Synthetic data (``task=synthetic``): it measures time and bytes, not
learning. Prints one line per variant and ``gpu_comm: ok``; a failed run or a byte count other than
k x 4 (fp32) / k x 2 (bf16) per step exits non-zero. ``benchmarks/gpu_check.sh`` runs it after the
``gpu`` tests.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

from benchmarks import harness, workloads
from cluster import netem

VARIANTS = {"dense": ["mask=dense", "comm=dense"],
            "sc-fp32": ["mask=random", "mask.always=[]", "comm=masked", "comm.wire_dtype=null"],
            "sc-bf16": ["mask=random", "mask.always=[]", "comm=masked", "comm.wire_dtype=bf16"]}
WARMUP = 2


def spec(args) -> dict:
    wl = workloads.get(args.model)
    backend = "nccl" if args.device == "cuda" else "gloo"
    total = WARMUP + args.steps
    run = [*wl.task, "task.num_test=16", f"batch_size={args.batch_size or wl.default_batch}", "eval_batch_size=16",
           f"steps={total}", "schedule=fish_fixed", "schedule/lr=constant", "optim.lr=1e-3", "optim.dense_lr=1e-3",
           "eval_every=0", f"logging.log_every={total}", "save_model=false", "save_diff=false", "seed=0",
           f"cluster.device={args.device}", f"cluster.backend={backend}", f"mask.density={args.density}"]
    return {"model": args.model, "meter": "steps", "variants": [
        {"id": name, "overrides": [o for o in run if name != "dense" or not o.startswith("mask.")] + extra,
         "warmup": WARMUP, "steps": args.steps} for name, extra in VARIANTS.items()]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mlp", help=f"a workload: {', '.join(workloads.WORKLOADS)}")
    p.add_argument("--ranks", type=int, default=1, help="one per GPU")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--density", type=float, default=0.005)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda: NCCL, one GPU per rank; cpu: Gloo (a dry run of this script)")
    p.add_argument("--timeout", type=float, default=600)
    args = p.parse_args(argv)
    if args.device == "cuda" and torch.cuda.device_count() < args.ranks:
        sys.exit(f"gpu_comm: --ranks {args.ranks} needs as many GPUs; torch sees {torch.cuda.device_count()} "
                 f"(--device cpu for a dry run)")
    with tempfile.TemporaryDirectory(prefix="gpu_comm-") as workdir, \
            netem.Link("unshaped", isolate=False) as link:
        rows, failures = harness.launch(link, args.ranks, spec(args), workdir=workdir, timeout=args.timeout,
                                        threads=max(1, (os.cpu_count() or 1) // args.ranks))
    for name, text in failures.items():
        print(f"gpu_comm: {name} FAILED: {text}")
    if failures:
        return 1
    by = {r["variant"]: r for r in rows}
    n, k = by["dense"]["params"], by["sc-fp32"]["k"]
    print(f"gpu_comm: {args.model} ({n:,} parameters), {args.ranks} {args.device} rank(s), density {args.density}, "
          f"median of {args.steps} steps")
    want = {"dense": 4 * n, "sc-fp32": 4 * k, "sc-bf16": 2 * k}  # fp32 gradients; k values in the wire dtype
    bad = []
    for name, r in by.items():
        sent = r["sync_bytes_per_step"]
        print(f"gpu_comm: {name:>8}  {r['step_s'] * 1e3:8.2f} ms/step  {sent:>14,.0f} B/step  "
              f"({sent / want['dense']:.4f} of dense)")
        if sent != want[name]:
            bad.append(f"{name}: {sent:.0f} B/step, expected {want[name]}")
    if k != round(args.density * n) or bad:
        print(f"gpu_comm: FAILED: k = {k} (expected {round(args.density * n)}); {'; '.join(bad)}")
        return 1
    print("gpu_comm: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
