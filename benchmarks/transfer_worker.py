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
    fishhead-D    the head alone for ``head_steps`` steps (the masked hook with the head as its mask:
                  its 10,010 gradient entries a step), then the FISH mask scored through that trained
                  head (a fresh head's random weights are what the encoder's gradients pass through
                  at step 0), then as fish-D for the remaining steps (the head's AdamW state restarts)
    fishtensor-D  FISH's scores (summed over ranks: every score, float32) ranked inside each tensor:
                  the same share of every tensor's entries, the head kept whole, k in all as FISH's
                  (random's spread over tensors, Fisher's choice within each); same hook and optimizer
    random-D      a random mask at D% (head kept whole), same hook and optimizer
    diffprune-D   diff pruning: ``l0_steps`` L0 steps (dense traffic: w and log_alpha gradients, ~2x
                  dense), projection to D%, then the masked hook + MaskedAdamW for the remaining steps
    head-only     the encoder frozen (no gradient), DDP + AdamW on the classifier head alone

Every method runs on the app's components: each rank's shard (``ShardedData``, examples of
similar length batched together), the app's mask kinds' settings, the step engine
(``sparsecomm.app.engine``) and the app's evaluation (every rank its slice of the test set, one
all-reduce), measured every ``eval_every`` steps with the clock stopped; the clock and the byte
counters cover training only (mask computation included). Over the network: what
each method's hook sends; ``wire_bytes_per_rank`` is the link's counter / ranks, barriers of
the evaluation points subtracted. Rank 0 writes the runs after each one (atomically).
"""
from __future__ import annotations

import copy
import gc
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from safetensors.torch import save as safetensors_bytes
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, post_localSGD_hook, powerSGD_hook
from torch.distributed.algorithms.model_averaging import averagers
from torch.nn.parallel import DistributedDataParallel as DDP

from sparsecomm import diff as sdiff
from sparsecomm.app import schema
from sparsecomm.app.data import ShardedData, evaluate
from sparsecomm.app.engine import StepEngine
from sparsecomm.diff_pruning import DiffPruning
from sparsecomm.fisher import fisher_mask, fisher_scores
from sparsecomm.hook import register_masked_allreduce
from sparsecomm.mask import Mask, count_for_density, matches_any
from sparsecomm.optim import MaskedAdamW

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tta_worker import build_task, mask_kind  # noqa: E402
from worker import PayloadCounter, TxReader, busy_cpu_seconds, measure_runs, optimizer_state_bytes  # noqa: E402


MASKED = ("fish", "fishhead", "fishtensor", "random", "diffprune")  # kinds with a density: "<kind>-<D%>"


def parse(method: str) -> tuple[str, float | None]:
    """``"fish-0.5"`` -> ("fish", 0.005); ``"dense"`` -> ("dense", None)."""
    kind, _, arg = method.partition("-")
    if kind in MASKED:
        return kind, float(arg) / 100
    return method, None


def state_bytes(opt) -> int:
    return opt.state_bytes() if hasattr(opt, "state_bytes") else optimizer_state_bytes(opt)


def diff_file_bytes(model, base, mask) -> dict:
    """Bytes of the task as a sparse diff (``sparsecomm.diff.save``) and of the whole model's file."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "task_diff.safetensors")
        sdiff.save(model, base, mask, path)
        diff_bytes = os.path.getsize(path)
    model_bytes = len(safetensors_bytes({n: t.detach().contiguous() for n, t in model.state_dict().items()}))
    return {"diff_bytes": diff_bytes, "model_file_bytes": model_bytes}


def run_one(run: dict, spec: dict, counter: PayloadCounter, tx: TxReader, per_barrier: float) -> dict:
    """One (method, lr, seed) on the app's components: this rank's shard (``ShardedData``), the
    app's Fisher/random mask kinds, the step engine and the app's evaluation."""
    method, lr, seed = run["method"], float(run["lr"]), int(run["seed"])
    kind, density = parse(method)
    rank, world = dist.get_rank(), dist.get_world_size()
    task = build_task(spec, seed)
    model = task.model
    model.train()
    device = torch.device("cpu")
    data = ShardedData(task, rank, world, batch_size=spec["batch_size"], eval_batch_size=128, seed=seed, device=device)
    base = copy.deepcopy(model) if kind in MASKED else None  # the diff's base
    numel = sum(p.numel() for p in model.parameters())
    k_half = count_for_density(0.005, numel)
    info: dict = {"numel": numel}
    fisher_batch = min(64, len(task.train_set) // world)  # Fisher scoring batch per rank
    state = averager = wrapper = None
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
        st = register_masked_allreduce(ddp_, mask)
        return ddp_, st, MaskedAdamW(net, mask, lr=lr, weight_decay=0.0)

    def fish(net) -> Mask:
        """The FISH mask of ``net`` as it is now (the app's Fisher settings, the candidate exchange)."""
        exchange = {}
        fisher = mask_kind("fisher", seed, task, data, net, density=density, num_samples=spec["num_samples"],
                           batch_size=fisher_batch)
        got = fisher_mask(net, data.fisher_batches(0, int(fisher.cfg.batch_size)), task.loss_fn,
                          density=density, num_samples=spec["num_samples"], always=fisher.always, stats=exchange)
        counter.bytes += exchange.get("gathered_bytes", 0)  # the candidates' all-gather (not all_reduce)
        info["score_exchange"] = exchange
        return got

    def fish_per_tensor(net) -> Mask:
        """D% of each tensor by its summed Fisher scores (the head whole): where random puts its entries."""
        scores, _ = fisher_scores(net, data.fisher_batches(0, fisher_batch), task.loss_fn,
                                  num_samples=spec["num_samples"] // world)
        head = sum(sc.numel() for nm, sc in scores.items() if matches_any(nm, task.head))
        share = (count_for_density(density, numel) - head) / (numel - head)  # k in all, the head counted, as FISH's
        bits = {}
        for name, score in scores.items():
            dist.all_reduce(score)  # every score: n x 4 bytes (counted), an investigation, not the protocol
            keep = torch.zeros(score.numel(), dtype=torch.bool)
            if matches_any(name, task.head):
                keep[:] = True
            else:
                keep[torch.topk(score.flatten(), max(1, round(share * score.numel()))).indices] = True
            bits[name] = keep.view(score.shape)
        return Mask(bits)

    dist.barrier()
    busy0, cpu0, wall0 = busy_cpu_seconds(), time.process_time(), time.perf_counter()
    tx0 = tx()
    counter.bytes = counter.calls = 0
    counter.active = True
    t_setup = time.perf_counter()
    if kind == "head-only":
        for n, p in model.named_parameters():
            p.requires_grad_(matches_any(n, task.head))
        ddp = make_ddp(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    elif kind == "fishhead":
        head_mask = Mask({n: torch.full(p.shape, matches_any(n, task.head)) for n, p in model.named_parameters()})
        ddp, state, opt = masked(model, head_mask)
        info["head_steps"] = spec["head_steps"]
    elif kind in ("fish", "fishtensor", "random"):
        if kind == "fish":
            mask = fish(model)
        elif kind == "fishtensor":
            mask = fish_per_tensor(model)
        else:
            mask = mask_kind("random", seed, task, data, model, density=density).next_mask(model)
        ddp, state, opt = masked(model, mask)
        info.update(k=mask.num_selected, mask_s=time.perf_counter() - t_setup)
    elif kind == "diffprune":
        cfg = OmegaConf.structured(schema.DiffPruningMask)
        wrapper = DiffPruning(model, structured=cfg.structured, stretch=tuple(cfg.stretch),
                              log_alpha_init=cfg.log_alpha_init, temperature=cfg.temperature,
                              ungated=task.head if cfg.ungated_head else ())
        ddp = make_ddp(wrapper)
        state = register_masked_allreduce(ddp, Mask.full(wrapper))
        state.dense = True
        opt = torch.optim.AdamW([{"params": list(wrapper.diff)},
                                 {"params": list(wrapper.log_alpha), "lr": float(cfg.alpha_lr)}], lr=lr, weight_decay=0.0)
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
    engine = StepEngine(task.loss_fn)
    clock = time.perf_counter() - t_setup
    counter.active = False

    curve = []
    grad_payload = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)

    def checkpoint(step: int, evaluated: torch.nn.Module):
        nonlocal excluded
        dist.barrier()
        t_a = tx()
        wire = (t_a - tx0 - excluded - per_barrier) / world
        acc = evaluate(evaluated, data.test_loader, task.loss_fn, device)["test_acc"]
        curve.append({"step": step, "seconds": clock, "wire_bytes_per_rank": wire,
                      "payload_bytes": counter.bytes, "accuracy": acc})
        dist.barrier()
        excluded += tx() - t_a + per_barrier

    checkpoint(0, net)
    for step in range(1, spec["steps"] + 1):
        t = time.perf_counter()
        counter.active = True
        if wrapper is not None and step == spec["l0_steps"] + 1:  # diff pruning: project, then fixed mask
            with torch.no_grad():
                mask = wrapper.project(density, always=list(task.head), field="density")
                net = wrapper.materialize(mask)
                net.train(wrapper.training)
            info.update(k=mask.num_selected, l0_gates_open=wrapper.nonzero_fraction())
            del ddp
            wrapper = None
            ddp, state, opt = masked(net, mask)
            engine = StepEngine(task.loss_fn)
        if kind == "fishhead" and step == spec["head_steps"] + 1:  # the head is trained: score, then mask
            t_mask = time.perf_counter()
            del ddp
            mask = fish(net)
            ddp, state, opt = masked(net, mask)
            engine = StepEngine(task.loss_fn)
            info.update(k=mask.num_selected, mask_s=time.perf_counter() - t_mask)
        l0 = wrapper
        engine.step(ddp, data.next_batch(), opt,
                    extra_loss=(lambda: float(cfg.l0_penalty) * l0.expected_l0()) if l0 is not None else None,
                    after_update=(lambda: averager.average_parameters(net.parameters())) if averager else None)
        if kind in ("dense", "head-only"):
            counter.bytes += grad_payload  # DDP's C++ reducer: not seen by the all_reduce counter
        counter.active = False
        clock += time.perf_counter() - t
        if step % spec["eval_every"] == 0 or step == spec["steps"]:
            checkpoint(step, wrapper if wrapper is not None else net)  # in the L0 phase: base + z w, gates deterministic
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
    del ddp, opt, state, model, net, base, engine
    gc.collect()
    return result


def main(spec_path: str) -> None:
    measure_runs(spec_path, lambda spec, *link: (lambda run=run: run_one(run, spec, *link) for run in spec["runs"]),
                 progress)


def progress(run: dict, seconds: float) -> str:
    """Rank 0's line after a run: final accuracy, training time and bytes, wall time in all."""
    last = run["curve"][-1]
    return (f"{run['method']:>13} lr {run['lr']:g} seed {run['seed']}: accuracy {last['accuracy']:.3f}, "
            f"{last['seconds']:.1f} s training, {last['wire_bytes_per_rank'] / 1e6:.2f} MB/rank on the wire "
            f"({seconds:.0f} s)")


if __name__ == "__main__":
    main(sys.argv[1])
