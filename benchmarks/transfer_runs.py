"""The fine-tuning runs of the transfer head-to-head, each one run of the app (:mod:`benchmarks.drive`).

Every (method, lr, seed) is ``task=wordnet`` (the packaged pretrained MiniLM, a fresh head) with
the method's ``comm=`` option and ``mask=`` kind, the same data order and number of steps, AdamW
without weight decay at the run's lr (constant), evaluated every ``--eval-every`` steps with the
clock stopped (:class:`benchmarks.meters.AccuracyCurve`):

    dense         comm=dense mask=dense: DDP's own all-reduce, AdamW on every entry
    fp16          comm=fp16: torch's fp16_compress_hook
    powersgd-rR   comm=powersgd comm.rank=R: torch's PowerSGD hook
    postlocal     comm=post_local comm.period=n/k(0.5%): torch's post-local SGD, parameters averaged
                  every period steps, so its payload per step equals FISH 0.5%'s
    fish-D        mask=fisher at D% (over ``--num-samples`` examples at step 0, no dense warm-up, the
                  head kept whole) + comm=masked + MaskedAdamW
    random-D      mask=random at D% (head kept whole), the same hook and optimizer
    diffprune-D   mask=diff_pruning at D% (``--l0-steps`` L0 steps, then the projected mask)
    head-only     mask=file with the classifier head's entries alone (what trains and what travels:
                  the head's gradient, as with a frozen encoder) + comm=masked + MaskedAdamW
"""
from __future__ import annotations

import os

import torch

from benchmarks import boxlink, harness
from cluster import netem
from sparsecomm.app.tasks import wordnet
from sparsecomm.mask import Mask, count_for_density, matches_any

# measured with the earlier per-rank worker (results/transfer_checks.md); the app has no head-first
# schedule and no per-tensor Fisher choice, so these are not runs of the app
RETIRED = {"fishhead": "the head trained alone before FISH scores", "fishtensor": "Fisher's choice inside each tensor"}


def parse(method: str) -> tuple[str, float | None]:
    """("fish", 0.005) for "fish-0.5"; (method, None) for methods without a density."""
    kind, _, arg = method.partition("-")
    if kind in ("fish", "random", "diffprune", *RETIRED) and arg:
        return kind, float(arg) / 100
    return method, None


def head_mask(a, workdir: str) -> tuple[str, int]:
    """The head-only mask file (every entry of the classifier head, nothing else) and the model's n."""
    torch.manual_seed(0)
    task = wordnet.build(train_size=8, test_size=8, data_dir=a.data_dir, model_dir=a.model_dir)
    mask = Mask({n: torch.full(p.shape, matches_any(n, task.head)) for n, p in task.model.named_parameters()})
    path = os.path.join(os.path.abspath(workdir), "head_only_mask.safetensors")
    mask.save(path)
    return path, sum(p.numel() for p in task.model.parameters())


def overrides(run: dict, a, facts: dict) -> list[str]:
    """The app's overrides of one (method, lr, seed)."""
    kind, density = parse(run["method"])
    if kind in RETIRED:
        raise SystemExit(f"error: --methods {run['method']}: {RETIRED[kind]} is not a run of the app; its results "
                         f"(results/transfer_checks.md) were measured with the earlier per-rank worker")
    task = ["task=wordnet", f"task.train_size={a.train_size}", f"task.test_size={a.test_size}"]
    task += [f"task.data_dir={a.data_dir}"] if a.data_dir else []
    task += [f"task.model_dir={a.model_dir}"] if a.model_dir else []
    lr = float(run["lr"])
    common = [*task, f"steps={a.steps}", f"batch_size={a.batch_size}", "eval_batch_size=128",
              f"eval_every={a.eval_every}", f"seed={int(run['seed'])}", "schedule=fish_fixed", "schedule/lr=constant",
              f"optim.lr={lr}", f"optim.dense_lr={lr}", "optim.weight_decay=0.0", "comm.sync_buffers=false",
              f"logging.log_every={a.steps}", "save_model=false"]
    if kind in ("dense", "fp16"):
        return common + ["mask=dense", f"comm={kind}"]
    if kind.startswith("powersgd-r"):
        return common + ["mask=dense", "comm=powersgd", f"comm.rank={int(kind.split('-r')[1])}"]
    if kind == "postlocal":
        period = max(1, round(facts["numel"] / count_for_density(0.005, facts["numel"])))
        return common + ["mask=dense", "comm=post_local", f"comm.period={period}"]
    masked = common + ["comm=masked"]
    if kind == "fish":
        return masked + ["mask=fisher", f"mask.density={density}", f"mask.num_samples={a.num_samples}",
                         f"mask.batch_size={min(64, a.train_size // (a.ranks * a.nodes))}"]
    if kind == "random":
        return masked + ["mask=random", f"mask.density={density}"]
    if kind == "diffprune":
        return masked + ["mask=diff_pruning", f"mask.density={density}", f"mask.l0_steps={a.l0_steps}"]
    if kind == "head-only":
        return masked + ["mask=file", f"mask.path={facts['head_mask']}"]
    raise SystemExit(f"error: --methods {run['method']}: not a method of this benchmark")


def as_run(row: dict) -> dict:
    """The fields the summary tables read, from the app's summary and the meter."""
    row.update(numel=row.get("params"), diff_bytes=row.get("task_diff_bytes"),
               model_file_bytes=row.get("full_model_bytes"), optimizer_state_bytes=row.get("opt_state_bytes"))
    if row.get("mask_score_bytes"):
        row["score_exchange"] = {"exchange": "candidates", "bytes_sent": row["mask_score_bytes"]}
    period = [o.split("=", 1)[1] for o in row["overrides"] if o.startswith("comm.period=")]
    if period:
        row["period"] = int(period[0])
    return row


def run_part(runs: list[dict], a, label: str) -> tuple[list[dict], list[str]]:
    """Each of ``runs`` ({method, lr, seed}) as one run of the app on the link; a run that fails is
    recorded with its output's tail and the others still run."""
    workdir = os.path.join(a.out, "tmp")
    os.makedirs(workdir, exist_ok=True)
    path, numel = head_mask(a, workdir)
    facts = {"head_mask": path, "numel": numel}
    variants = [dict(r, id=f"{r['method']}-lr{r['lr']:g}-s{r['seed']}", overrides=overrides(r, a, facts))
                for r in runs]
    spec = {"model": f"wordnet-{label}", "meter": "curve", "tx_path": "/sys/class/net/lo/statistics/tx_bytes",
            "variants": variants}
    if a.nodes > 1:  # every node's eth0 (between nodes) and lo (inside one), summed over nodes
        spec["ifaces"] = ["eth0", "lo"]
    link_cm = boxlink.BoxLink(a.rate, a.nodes) if a.nodes > 1 else netem.Link(a.rate, isolate=not a.no_namespace)
    with link_cm as link:
        if link.fallback:
            print(f"WARNING: {link.fallback}")
        threads = max(1, (os.cpu_count() or 1) // (a.ranks * a.nodes))
        rows, failed = harness.launch(link, a.ranks, spec, workdir=workdir, timeout=a.timeout, threads=threads,
                                      echo=lambda s: print(s, flush=True))
    os.unlink(path)
    harness.remove_workdir(workdir)
    return [as_run(r) for r in rows], [f"{k}: {v[-3000:]}" for k, v in failed.items()]
