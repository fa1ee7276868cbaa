"""Per-rank fine-tuning loop of the transfer head-to-head; ``transfer.py`` starts it with torchrun
inside the emulated link.

    python -m torch.distributed.run --nproc_per_node 2 ... benchmarks/transfer_worker.py SPEC.json

SPEC (written by ``transfer.py``)::

    {"task": "wordnet", "task_kwargs": {...}, "runs": [{"method": "fish-0.5", "lr": 1e-3, "seed": 0}, ...],
     "steps": 300, "batch_size": 32, "eval_every": 50, "num_samples": 1024, "l0_steps": 100,
     "threads": 1, "tx_path": "/sys/class/net/lo/statistics/tx_bytes", "out": "runs.json"}

Methods (every one starts from the same pretrained weights and fresh head for a seed, sees the
same batches in the same order and gets ``steps`` optimizer steps, AdamW without weight decay at
the run's ``lr``):

    dense         DDP (C++ reducer), AdamW on every entry
    fp16          DDP + torch's fp16_compress_hook
    powersgd-rR   torch's PowerSGD hook, rank R, one bucket, start_powerSGD_iter=2, eps 1e-8
    postlocal     torch's post_localSGD_hook (PostLocalSGDState, start_localSGD_iter=1, no gradient
                  all-reduce after it) + PeriodicModelAverager(period, warmup 1): parameters averaged
                  every ``period`` steps, period = n / k(0.5%), so its payload per step equals FISH 0.5%'s
    fish-D        FISH mask at D% (``fisher_mask`` over ``num_samples`` examples at step 0, no dense
                  warm-up, the head kept whole) + sparsecomm's masked hook + MaskedAdamW
    random-D      a random mask at D% (head kept whole), same hook and optimizer
    diffprune-D   diff pruning: ``l0_steps`` L0 steps (dense traffic: w and log_alpha gradients, ~2x
                  dense), projection to D%, then the masked hook + MaskedAdamW for the remaining steps
    head-only     the encoder frozen (no gradient), DDP + AdamW on the classifier head alone

Test accuracy is measured by rank 0 every ``eval_every`` steps with the clock stopped; the clock
and the byte counters cover training only (mask computation included). Over the network: what
each method's hook sends; ``wire_bytes_per_rank`` is the link's counter / ranks, barriers of
the evaluation points subtracted. Rank 0 writes the runs after each one (atomically).
"""
from __future__ import annotations

import gc
import json
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tta_worker import batches, build_task  # noqa: E402
from worker import PayloadCounter, TxReader, barrier_cost, busy_cpu_seconds, optimizer_state_bytes  # noqa: E402


def parse(method: str) -> tuple[str, float | None]:
    """``"fish-0.5"`` -> ("fish", 0.005); ``"dense"`` -> ("dense", None)."""
    kind, _, arg = method.partition("-")
    if kind in ("fish", "random", "diffprune"):
        return kind, float(arg) / 100
    return method, None


@torch.no_grad()
def shared_accuracy(task, model) -> float:
    """Test accuracy, each rank evaluating every world-th example (in length order: less padding);
    one all-reduce of 2 float64 numbers."""
    from torch.utils.data import DataLoader, Subset

    rank, world = dist.get_rank(), dist.get_world_size()
    test = task.test_set
    mine = list(range(rank, len(test), world))
    if hasattr(test, "lengths"):
        mine.sort(key=test.lengths.__getitem__)
    was = model.training
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64)
    for x, y in DataLoader(Subset(test, mine), batch_size=128, collate_fn=task.collate_fn):
        out = model(**x) if isinstance(x, dict) else model(x)
        logits = out.logits if hasattr(out, "logits") else out
        counts += torch.tensor([float((logits.argmax(-1) == y).sum()), float(y.numel())], dtype=torch.float64)
    model.train(was)
    dist.all_reduce(counts)
    return float(counts[0] / counts[1])


def state_bytes(opt) -> int:
    return opt.state_bytes() if hasattr(opt, "state_bytes") else optimizer_state_bytes(opt)


def diff_file_bytes(model, base, mask) -> dict:
    """Bytes of the task as a sparse diff (``sparsecomm.diff.save``) and of the whole model's file."""
    import sparsecomm.diff as sdiff
    from safetensors.torch import save

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "task_diff.safetensors")
        sdiff.save(model, base, mask, path)
        diff_bytes = os.path.getsize(path)
    model_bytes = len(save({n: t.detach().contiguous() for n, t in model.state_dict().items()}))
    return {"diff_bytes": diff_bytes, "model_file_bytes": model_bytes}


def run_one(run: dict, spec: dict, counter: PayloadCounter, tx: TxReader, per_barrier: float) -> dict:
    import sparsecomm
    from sparsecomm.mask import count_for_density
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, post_localSGD_hook, powerSGD_hook
    from torch.distributed.algorithms.model_averaging import averagers

    method, lr, seed = run["method"], float(run["lr"]), int(run["seed"])
    kind, density = parse(method)
    rank, world = dist.get_rank(), dist.get_world_size()
    task = build_task(spec, seed)
    model = task.model
    model.train()
    base = None
    if kind in ("fish", "random", "diffprune"):
        import copy
        base = copy.deepcopy(model)  # the pretrained encoder + the seed's fresh head: the diff's base
    numel = sum(p.numel() for p in model.parameters())
    k_half = count_for_density(0.005, numel)
    data = batches(task, rank, world, spec["batch_size"], seed)
    info: dict = {"numel": numel}
    state = averager = l0 = None
    opt = None

    excluded = 0  # bytes on the link that are not training: DDP's start-up broadcast, evaluation

    def make_ddp(module, **kw):
        """DDP(module): its construction broadcasts rank 0's weights (the same in every method,
        identical here already): not counted."""
        nonlocal excluded
        b0 = tx()
        ddp_ = DDP(module, broadcast_buffers=False, **kw)
        dist.barrier()
        excluded += tx() - b0
        return ddp_

    def masked(net, mask):
        """The masked hook on a fresh DDP of ``net`` (plain model) + MaskedAdamW."""
        ddp_ = make_ddp(net)
        st = sparsecomm.register_masked_allreduce(ddp_, mask)
        return ddp_, st, sparsecomm.MaskedAdamW(net, mask, lr=lr, weight_decay=0.0)

    dist.barrier()
    busy0, cpu0, wall0 = busy_cpu_seconds(), time.process_time(), time.perf_counter()
    tx0 = tx()
    counter.bytes = counter.calls = 0
    counter.active = True
    t_setup = time.perf_counter()
    if kind == "head-only":
        for n, p in model.named_parameters():
            p.requires_grad_(sparsecomm.mask.matches_any(n, task.head))
        ddp = make_ddp(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    elif kind in ("fish", "random"):
        if kind == "fish":
            fisher_batch = min(64, len(task.train_set) // world)
            fisher_data = (b for _, b in zip(range(10_000), batches(task, rank, world, fisher_batch, seed + 7)))
            exchange = {}
            mask = sparsecomm.fisher_mask(model, fisher_data, task.loss_fn, density=density,
                                          num_samples=spec["num_samples"], always=tuple(task.head), stats=exchange)
            counter.bytes += exchange.get("gathered_bytes", 0)  # the candidates' all-gather (not all_reduce)
            info["score_exchange"] = exchange
        else:
            mask = sparsecomm.random_mask(model, density=density, seed=seed, always=tuple(task.head))
        ddp, state, opt = masked(model, mask)
        info.update(k=mask.num_selected, mask_s=time.perf_counter() - t_setup)
    elif kind == "diffprune":
        from omegaconf import OmegaConf
        from sparsecomm.app.phases import L0Phase

        cfg = OmegaConf.load(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                          "conf", "mask", "diff_pruning.yaml"))
        cfg.density = density
        l0 = L0Phase(cfg, task.head, start=0)
        wrapper = l0.wrap(model)
        ddp = make_ddp(wrapper)
        state = sparsecomm.register_masked_allreduce(ddp, sparsecomm.Mask.full(wrapper))
        state.dense = True
        gates = list(wrapper.log_alpha)
        opt = torch.optim.AdamW([{"params": list(wrapper.diff)},
                                 {"params": gates, "lr": float(cfg.alpha_lr)}], lr=lr, weight_decay=0.0)
        info.update(l0_steps=spec["l0_steps"], l0_penalty=float(cfg.l0_penalty))
    else:
        single_bucket = kind.startswith("powersgd")
        ddp = make_ddp(model, bucket_cap_mb=(1 << 16) if single_bucket else 25)
        if kind == "fp16":
            ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
        elif kind.startswith("powersgd"):
            state = powerSGD_hook.PowerSGDState(None, matrix_approximation_rank=int(kind.split("-r")[1]),
                                                start_powerSGD_iter=2, orthogonalization_epsilon=1e-8)
            ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        elif kind == "postlocal":
            period = max(1, round(numel / k_half))
            state = post_localSGD_hook.PostLocalSGDState(process_group=None, subgroup=None, start_localSGD_iter=1,
                                                         post_local_gradient_allreduce=False)
            ddp.register_comm_hook(state, post_localSGD_hook.post_localSGD_hook)
            averager = averagers.PeriodicModelAverager(period=period, warmup_steps=1)
            info["period"] = period
        elif kind != "dense":
            raise ValueError(f"unknown method {method!r}")
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    net = model
    clock = time.perf_counter() - t_setup
    counter.active = False

    curve = []
    grad_payload = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)

    def checkpoint(step: int):
        nonlocal excluded
        dist.barrier()
        t_a = tx()
        wire = (t_a - tx0 - excluded - per_barrier) / world
        acc = shared_accuracy(task, net)
        curve.append({"step": step, "seconds": clock, "wire_bytes_per_rank": wire,
                      "payload_bytes": counter.bytes, "accuracy": acc})
        dist.barrier()
        excluded += tx() - t_a + per_barrier

    checkpoint(0)
    for step in range(1, spec["steps"] + 1):
        t = time.perf_counter()
        counter.active = True
        if l0 is not None and step == spec["l0_steps"] + 1:  # diff pruning: project, then fixed mask
            mask, net = l0.finish(list(task.head), 0)
            del ddp
            ddp, state, opt = masked(net, mask)
            info.update(k=mask.num_selected, l0_gates_open=l0.stats.get("l0_gates_open"))
        x, y = next(data)
        opt.zero_grad(set_to_none=True)
        out = ddp(**x) if isinstance(x, dict) else ddp(x)
        loss = task.loss_fn(out, y)
        if l0 is not None and l0.active:
            loss = loss + l0.penalty()
        loss.backward()
        opt.step()
        if averager is not None:
            averager.average_parameters(net.parameters())
        if kind in ("dense", "head-only"):
            counter.bytes += grad_payload  # DDP's C++ reducer: not seen by the all_reduce counter
        counter.active = False
        clock += time.perf_counter() - t
        if step % spec["eval_every"] == 0 or step == spec["steps"]:
            if l0 is not None and l0.active:
                net_eval, net = net, l0.wrapper  # evaluate base + z w with deterministic gates
                checkpoint(step)
                net = net_eval
            else:
                checkpoint(step)
    # the share of the machine's cores that OTHER processes used meanwhile (a shared machine)
    ours = torch.tensor([time.process_time() - cpu0], dtype=torch.float64)
    dist.all_reduce(ours)
    busy1, wall = busy_cpu_seconds(), time.perf_counter() - wall0
    if busy0 is not None and busy1 is not None:
        info["others_cpu_share"] = max(0.0, busy1 - busy0 - float(ours)) / (wall * (os.cpu_count() or 1))
    info["optimizer_state_bytes"] = state_bytes(opt)
    if state is not None and hasattr(state, "bytes_sent"):
        info["lib_bytes_sent"] = state.bytes_sent
    if base is not None and rank == 0:
        info.update(diff_file_bytes(net, base, state.mask))
    result = {"method": method, "lr": lr, "seed": seed, "curve": curve, "world_size": world, **info}
    del ddp, opt, state, model, net, base
    gc.collect()
    return result


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
        for run in spec["runs"]:
            t = time.perf_counter()
            runs.append(run_one(run, spec, counter, tx, per_barrier))
            if dist.get_rank() == 0:
                last = runs[-1]["curve"][-1]
                print(f"[worker] {run['method']:>13} lr {run['lr']:g} seed {run['seed']}: accuracy "
                      f"{last['accuracy']:.3f}, {last['seconds']:.1f} s training, "
                      f"{last['wire_bytes_per_rank'] / 1e6:.2f} MB/rank on the wire "
                      f"({time.perf_counter() - t:.0f} s)", flush=True)
                tmp = spec["out"] + ".tmp"
                with open(tmp, "w") as f:
                    json.dump({"runs": runs, "barrier_bytes": per_barrier}, f)
                os.replace(tmp, spec["out"])
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
