"""Per-rank training loop of the time-to-accuracy benchmark; torchrun starts it inside the link.

    python -m torch.distributed.run --nproc_per_node N ... benchmarks/tta_worker.py SPEC.json

SPEC (written by ``time_to_accuracy.py``)::

    {"task": "digits", "task_kwargs": {}, "methods": ["dense", "fp16", "powersgd-r4", "fish", "random"],
     "seeds": [0], "steps": 400, "batch_size": 32, "dense_steps": 20, "density": 0.005,
     "dense_lr": 3e-3, "lr": 3e-2, "num_samples": 256, "eval_every": 20, "threads": 1,
     "tx_path": "/sys/class/net/lo/statistics/tx_bytes", "out": "curves.json"}

Methods: ``dense`` (DDP + AdamW at ``dense_lr``), ``fp16`` (fp16_compress_hook), ``powersgd-r4``
(rank 4, one bucket, start_powerSGD_iter=2, eps 1e-8), ``fish`` / ``random`` (``dense_steps``
dense steps through the masked hook with ``state.dense = True`` and AdamW, then the FISH mask
(``fisher_mask`` over ``num_samples`` examples, the task's head kept whole) or a random mask of
the same density, and MaskedAdamW at ``lr``). Every method starts from the same weights and sees
the same batches. Test accuracy is measured by rank 0 every ``eval_every`` steps with the
clock stopped; the clock and the byte counters cover training only (mask computation included).
Rank 0 writes the curves after each method.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, RandomSampler, Subset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from worker import PayloadCounter, TxReader, barrier_cost  # noqa: E402


def build_task(spec: dict, seed: int):
    torch.manual_seed(seed)
    mod = importlib.import_module(f"sparsecomm.app.tasks.{spec['task']}")
    return mod.build(**spec.get("task_kwargs", {}))


def logits_of(outputs):
    return outputs.logits if hasattr(outputs, "logits") else outputs


def batches(task, rank: int, world: int, batch_size: int, seed: int):
    """Endless batches from this rank's shard (every world-th example), reshuffled each epoch;
    examples of similar length grouped into a batch when the task gives ``lengths``."""
    index = list(range(rank, len(task.train_set), world))
    if len(index) < batch_size:  # drop_last would leave no batch at all: an endless empty loop
        raise ValueError(f"batch size {batch_size} is larger than rank {rank}'s shard of {len(index)} examples")
    shard = Subset(task.train_set, index)
    lengths = getattr(task, "lengths", None)
    epoch = 0
    while True:
        gen = torch.Generator().manual_seed(seed * 100003 + epoch * 1009 + rank)
        if lengths is not None:
            from sparsecomm.app.batching import LengthGroupedBatches
            order = RandomSampler(shard, generator=gen)
            grouped = LengthGroupedBatches(order, [lengths[i] for i in index], batch_size, seed=seed * 7 + rank)
            grouped.set_epoch(epoch)
            loader = DataLoader(shard, batch_sampler=grouped, collate_fn=task.collate_fn)
        else:
            loader = DataLoader(shard, batch_size=batch_size, shuffle=True, drop_last=True, generator=gen,
                                collate_fn=task.collate_fn)
        yield from loader
        epoch += 1


@torch.no_grad()
def accuracy(task, model) -> float:
    was = model.training
    model.eval()
    correct = total = 0
    test = task.test_set
    if hasattr(test, "lengths"):  # padded per batch: evaluate in length order (the accuracy is the same)
        test = Subset(test, sorted(range(len(test)), key=test.lengths.__getitem__))
    for x, y in DataLoader(test, batch_size=256, collate_fn=task.collate_fn):
        out = model(**x) if isinstance(x, dict) else model(x)
        correct += int((logits_of(out).argmax(-1) == y).sum())
        total += int(y.numel())
    model.train(was)
    return correct / total


def run_method(method: str, seed: int, spec: dict, counter: PayloadCounter, tx: TxReader, per_barrier: float):
    import sparsecomm
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    rank, world = dist.get_rank(), dist.get_world_size()
    task = build_task(spec, seed)
    model = task.model
    model.train()
    data = batches(task, rank, world, spec["batch_size"], seed)
    single_bucket = method.startswith("powersgd")
    ddp = DDP(model, bucket_cap_mb=(1 << 16) if single_bucket else 25, broadcast_buffers=False)
    state = None
    if method == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif method.startswith("powersgd"):
        state = powerSGD_hook.PowerSGDState(None, matrix_approximation_rank=int(method.split("-r")[1]),
                                            start_powerSGD_iter=2, orthogonalization_epsilon=1e-8)
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    elif method in ("fish", "random"):
        state = sparsecomm.register_masked_allreduce(ddp, sparsecomm.Mask.full(model))
        state.dense = True
    elif method != "dense":
        raise ValueError(f"unknown method {method!r}")
    opt = torch.optim.AdamW(model.parameters(), lr=spec["dense_lr"], weight_decay=0.0)

    curve, info = [], {}
    clock = 0.0
    barriers = 0

    def checkpoint(step: int):
        nonlocal barriers
        dist.barrier()
        barriers += 1
        wire = (tx() - tx0 - barriers * per_barrier) / world if rank == 0 else 0
        acc = accuracy(task, model) if rank == 0 else 0.0
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
        if method in ("fish", "random") and step == spec["dense_steps"] + 1:
            always = tuple(task.head)
            if method == "fish":
                def loss_fn(out, y):
                    return task.loss_fn(out, y)
                fisher_data = (b for _, b in zip(range(10_000), batches(task, rank, world, 64, seed + 7)))
                mask = sparsecomm.fisher_mask(model, fisher_data, loss_fn, density=spec["density"],
                                              num_samples=spec["num_samples"], always=always)
            else:
                mask = sparsecomm.random_mask(model, density=spec["density"], seed=seed, always=always)
            state.set_mask(mask)
            state.dense = False
            opt = sparsecomm.MaskedAdamW(model, mask, lr=spec["lr"], weight_decay=0.0)
            info.update(k=mask.num_selected, density_actual=mask.density, mask_s=time.perf_counter() - t)
        x, y = next(data)
        opt.zero_grad(set_to_none=True)
        out = ddp(**x) if isinstance(x, dict) else ddp(x)
        task.loss_fn(out, y).backward()
        opt.step()
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
    with open(spec_path) as f:
        spec = json.load(f)
    torch.set_num_threads(int(spec.get("threads", 1)))
    dist.init_process_group("gloo")
    counter = PayloadCounter()
    tx = TxReader(spec["tx_path"])
    per_barrier = barrier_cost(tx)
    runs = []
    try:
        for seed in spec["seeds"]:
            for method in spec["methods"]:
                t = time.perf_counter()
                runs.append(run_method(method, seed, spec, counter, tx, per_barrier))
                if dist.get_rank() == 0:
                    last = runs[-1]["curve"][-1]
                    print(f"[worker] seed {seed} {method:>12}: accuracy {last['accuracy']:.3f}, "
                          f"{last['seconds']:.1f} s training, {last['wire_bytes_per_rank'] / 1e6:.2f} MB/rank "
                          f"on the wire ({time.perf_counter() - t:.0f} s)", flush=True)
                    tmp = spec["out"] + ".tmp"
                    with open(tmp, "w") as f:
                        json.dump({"runs": runs, "barrier_bytes": per_barrier}, f)
                    os.replace(tmp, spec["out"])
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
