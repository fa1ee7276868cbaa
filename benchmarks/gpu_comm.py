"""A short NCCL benchmark on the GPUs of one machine: step time and bytes handed to all-reduce,
dense DDP against the masked all-reduce hook (fp32 and bf16 wire) with ``MaskedAdamW``.

    torchrun --nproc-per-node 1 -m benchmarks.gpu_comm [--model mlp] [--steps 20] [--density 0.005]
    torchrun --nproc-per-node 2 -m benchmarks.gpu_comm --device cpu --model tiny   # a dry run, Gloo

One rank per GPU (``cuda:LOCAL_RANK``); with one GPU the world has one rank, so NCCL's
all-reduce is local and the numbers measure the hook's CUDA path (packing, casts, the fused
all-reduce), not a network. Synthetic batches (``workloads.py``): it measures time and bytes, not
learning. Rank 0 prints one line per variant and ``gpu_comm: ok``; any failure exits non-zero.
``benchmarks/gpu_check.sh`` runs it after the ``gpu`` tests.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from benchmarks import workloads

import sparsecomm  # noqa: E402


def run_variant(name: str, wl, args, device) -> dict:
    """Time ``args.steps`` steps (after 2 warm-up steps) of one variant; bytes from the hook's state."""
    torch.manual_seed(0)
    model = wl.build().to(device)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if name == "dense":
        state, opt = None, torch.optim.AdamW(model.parameters(), lr=1e-3)
    else:
        mask = sparsecomm.random_mask(model, density=args.density, seed=0)
        state = sparsecomm.register_masked_allreduce(ddp, mask, wire_dtype=None if name.endswith("fp32") else "bf16")
        opt = sparsecomm.MaskedAdamW(model, mask, lr=1e-3)
    gen = torch.Generator().manual_seed(dist.get_rank())
    x, y = (t.to(device) for t in wl.batch(args.batch_size or wl.default_batch, gen))
    times = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda _device: None)
    for step in range(args.steps + 2):
        sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(workloads.logits_of(ddp(x)), y)
        loss.backward()
        opt.step()
        sync(device)
        if step >= 2:
            times.append(time.perf_counter() - t0)
    if not torch.isfinite(loss):
        raise RuntimeError(f"{name}: the loss is {loss.item()}")
    n = sum(p.numel() for p in model.parameters())
    sent = state.bytes_sent / state.steps if state is not None else 4 * n  # dense DDP: fp32 buckets
    return {"variant": name, "step_ms": 1e3 * sorted(times)[len(times) // 2], "bytes_per_step": sent, "numel": n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mlp", help=f"a workload: {', '.join(workloads.WORKLOADS)}")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--density", type=float, default=0.005)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda: NCCL, one GPU per rank; cpu: Gloo (a dry run of this script)")
    args = p.parse_args()
    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("gpu_comm: needs CUDA (torch.cuda.is_available() is False); --device cpu for a dry run")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        wl = workloads.get(args.model)
        rows = [run_variant(v, wl, args, device) for v in ("dense", "sc-fp32", "sc-bf16")]
        if dist.get_rank() == 0:
            dense = rows[0]
            print(f"gpu_comm: {args.model} ({dense['numel']:,} parameters), {dist.get_world_size()} "
                  f"{dist.get_backend()} rank(s) on {device.type}, "
                  f"density {args.density}, median of {args.steps} steps")
            for r in rows:
                print(f"gpu_comm: {r['variant']:>8}  {r['step_ms']:8.2f} ms/step  {r['bytes_per_step']:>14,.0f} B/step"
                      f"  ({r['bytes_per_step'] / dense['bytes_per_step']:.4f} of dense)")
            k = round(args.density * dense["numel"])
            want = {"sc-fp32": 4 * k, "sc-bf16": 2 * k}
            for r in rows[1:]:  # the hook hands k values per step to NCCL, in the wire dtype
                if abs(r["bytes_per_step"] - want[r["variant"]]) > 0.01 * want[r["variant"]]:
                    raise RuntimeError(f"{r['variant']}: {r['bytes_per_step']:.0f} B/step, expected ~{want[r['variant']]}")
            print("gpu_comm: ok")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
