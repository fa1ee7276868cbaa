"""Per-rank training loop of the time-to-accuracy benchmark; torchrun starts it inside the link.

    python -m torch.distributed.run --nproc_per_node N ... benchmarks/tta_worker.py SPEC.json

SPEC (written by ``time_to_accuracy.py``)::

    {"task": "digits", "task_kwargs": {}, "methods": ["dense", "fp16", "powersgd-r4", "fish", "random"],
     "seeds": [0], "steps": 400, "batch_size": 32, "dense_steps": 20, "density": 0.005,
     "dense_lr": 3e-3, "lr": 3e-2, "num_samples": 256, "eval_every": 20, "threads": 1,
     "tx_path": "/sys/class/net/lo/statistics/tx_bytes", "out": "curves.json"}

Methods: ``dense`` (DDP + AdamW at ``dense_lr``), ``fp16`` (fp16_compress_hook), ``powersgd-r4``
(rank 4, one bucket, start_powerSGD_iter=2, eps 1e-8), ``fish`` / ``random`` (``dense_steps``
dense steps through the app's masked gradient sync in dense mode and AdamW, then the app's
``mask=fisher`` (over ``num_samples`` examples, the task's head kept whole) or ``mask=random``
of the same density, and MaskedAdamW at ``lr``). Every method runs on the app's components:
each rank's shard (``ShardedData``), the step engine (``sparsecomm.app.engine``) and the app's
evaluation (every rank its slice of the test set, one all-reduce), so it measures what users run.
Every method starts from the same weights and sees the same batches; test accuracy is measured
every ``eval_every`` steps with the clock stopped; the clock and the byte counters cover
training only (mask computation included).
Rank 0 writes the curves after each method.
"""
from __future__ import annotations

import importlib
import os
import sys
import time

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from sparsecomm.app.data import ShardedData, evaluate
from sparsecomm.app.engine import StepEngine
from sparsecomm.app.gradient_sync import GradientSync
from sparsecomm.app import schema
from sparsecomm.app.masks import Setting, build_mask_kind
from sparsecomm.optim import MaskedAdamW

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from worker import PayloadCounter, TxReader, baseline_ddp, measure_runs  # noqa: E402


def build_task(spec: dict, seed: int):
    torch.manual_seed(seed)
    mod = importlib.import_module(f"sparsecomm.app.tasks.{spec['task']}")
    return mod.build(**spec.get("task_kwargs", {}))


def mask_kind(name: str, seed: int, task, data, model, **fields):
    """The app's ``mask=<name>`` kind (its schema's defaults, then ``fields``) on this model."""
    cfg = OmegaConf.structured(schema.OPTIONS["mask"][name])
    cfg.name = name
    if "seed" in cfg:
        cfg.seed = seed
    for key, value in fields.items():
        cfg[key] = value
    return build_mask_kind(cfg, Setting(task, data, model, seed))


def run_method(method: str, seed: int, spec: dict, counter: PayloadCounter, tx: TxReader, per_barrier: float):
    """One method, on the app's components: this rank's shard (``ShardedData``), the app's mask
    kinds, its gradient sync and its step engine, and its evaluation (every rank its slice)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    task = build_task(spec, seed)
    model = task.model
    model.train()
    device = torch.device("cpu")
    data = ShardedData(task, rank, world, batch_size=spec["batch_size"], eval_batch_size=256, seed=seed,
                       device=device)
    if method.startswith("powersgd"):
        ddp, state = baseline_ddp(model, "powersgd", int(method.split("-r")[1]))
    elif method in ("dense", "fp16", "fish", "random"):
        ddp, state = baseline_ddp(model, "fp16" if method == "fp16" else None)
    else:
        raise ValueError(f"unknown method {method!r}")
    sync, kind = None, None
    if method in ("fish", "random"):
        extra = {"num_samples": spec["num_samples"]} if method == "fish" else {}
        kind = mask_kind("fisher" if method == "fish" else "random", seed, task, data, model, density=spec["density"],
                         **extra)
        sync = GradientSync(ddp, masked=True, comm=OmegaConf.create({"wire_dtype": None, "fused": True}))
        state = sync.state
    opt = torch.optim.AdamW(model.parameters(), lr=spec["dense_lr"], weight_decay=0.0)
    engine = StepEngine(task.loss_fn)

    curve, info = [], {}
    clock = 0.0
    barriers = 0

    def checkpoint(step: int):
        nonlocal barriers
        dist.barrier()
        barriers += 1
        wire = (tx() - tx0 - barriers * per_barrier) / world if rank == 0 else 0
        counter.active = False  # the evaluation's all-reduce of 3 float64 is not training traffic
        acc = evaluate(model, data.test_loader, task.loss_fn, device)["test_acc"]
        counter.active = True
        barriers += 1  # its bytes on the wire are about a barrier's
        curve.append({"step": step, "seconds": clock, "wire_bytes_per_rank": wire,
                      "payload_bytes": counter.bytes, "accuracy": acc})
        dist.barrier()
        barriers += 1

    dist.barrier()
    tx0 = tx() if rank == 0 else 0
    counter.bytes = counter.calls = 0
    counter.active = True
    dense_payload = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    checkpoint(0)
    for step in range(1, spec["steps"] + 1):
        t = time.perf_counter()
        if kind is not None and step == spec["dense_steps"] + 1:
            mask = kind.next_mask(model)
            sync.set_mask(mask)
            sync.set_dense(False)
            opt = MaskedAdamW(model, mask, lr=spec["lr"], weight_decay=0.0)
            info.update(k=mask.num_selected, density_actual=mask.density, mask_s=time.perf_counter() - t)
        engine.step(ddp, data.next_batch(), opt, sync=sync)
        if method == "dense":
            counter.bytes += dense_payload  # DDP's C++ reducer: not seen by the all_reduce counter
        clock += time.perf_counter() - t
        if step % spec["eval_every"] == 0 or step == spec["steps"]:
            checkpoint(step)
    counter.active = False
    if state is not None and hasattr(state, "bytes_sent"):
        info["lib_bytes_sent"] = state.bytes_sent
    return {"method": method, "seed": seed, "curve": curve, "world_size": world, **info}


def main(spec_path: str) -> None:
    measure_runs(spec_path, lambda spec, *link: (lambda seed=seed, method=method: run_method(method, seed, spec, *link)
                                                 for seed in spec["seeds"] for method in spec["methods"]), progress)


def progress(run: dict, seconds: float) -> str:
    """Rank 0's line after a method: final accuracy, training time and bytes, wall time in all."""
    last = run["curve"][-1]
    return (f"seed {run['seed']} {run['method']:>12}: accuracy {last['accuracy']:.3f}, {last['seconds']:.1f} s "
            f"training, {last['wire_bytes_per_rank'] / 1e6:.2f} MB/rank on the wire ({seconds:.0f} s)")


if __name__ == "__main__":
    main(sys.argv[1])
