"""Fine-tuning head-to-head (issue 11): the packaged pretrained MiniLM on WordNet noun supersenses
(``task=wordnet``), 2 ranks on an emulated 1 Gbit link, every method with the same data order,
the same number of steps and a 3-value learning-rate sweep.

    python -m benchmarks.transfer --quick                      # 1 seed, short, middle lr: < 15 min
    python -m benchmarks.transfer --part sweep                 # 1 seed, half budget, 3 lrs per method
    python -m benchmarks.transfer --part final --methods dense fish-0.5 --tag a   # best lr of the sweep
    python -m benchmarks.transfer --merge results/transfer_part_a.json results/transfer_part_b.json

Each run is one run of the app (:mod:`benchmarks.transfer_runs` gives each method's ``comm=``
option and ``mask=`` kind): dense DDP, fp16 hook, PowerSGD rank 1 and 4, post-local SGD (period so
its payload per step equals FISH 0.5%'s), FISH 0.5% and 2% (mask at step 0, no dense warm-up),
random 0.5% and 2%, diff pruning 0.5%, and the head-only baseline (only the head's entries train
and travel). Learning-rate grids (AdamW, no weight decay, constant): dense-type methods
{3e-5, 1e-4, 3e-4}; masked methods {3e-4, 1e-3, 3e-3}; head-only {1e-3, 3e-3, 1e-2}. The
sweep runs one seed for ``--sweep-steps``; ``--part final`` takes each method's best lr from
``--sweep`` (else the grid's middle) and runs ``--seeds`` seeds for dense, FISH, random and
PowerSGD r4, one for the others. Parts write ``transfer_part_<tag>.json``; ``--merge`` joins
parts (and a sweep) into ``transfer.{md,json}`` and ``transfer_{time,bytes}.png``.

Reported per method: final test accuracy (mean, per seed), training seconds, bytes on the wire
per rank, time and bytes to 95% of dense's final accuracy, optimizer state, k, and the task as a
sparse diff (``sparsecomm.diff``) against the model's file size. Timings on a shared machine
are marked with the share of CPU other processes used.
"""
from __future__ import annotations

import argparse
import json
import os
import time

from benchmarks import report
from benchmarks.transfer_results import METHODS, publish, settings_note, sweep_table
from benchmarks.transfer_runs import RETIRED, parse, run_part
from cluster import netem

SEEDED = ("dense", "fish-0.5", "fish-2", "random-0.5", "random-2", "powersgd-r4")  # --seeds seeds each
GRIDS = {"dense": (3e-5, 1e-4, 3e-4), "masked": (3e-4, 1e-3, 3e-3), "head": (1e-3, 3e-3, 1e-2)}


def grid(method: str) -> tuple[float, ...]:
    if method.startswith(("fish", "random", "diffprune")):
        return GRIDS["masked"]
    return GRIDS["head"] if method == "head-only" else GRIDS["dense"]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["final", "sweep"], default="final")
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--seeds", type=int, default=3, help=f"seeds for {', '.join(SEEDED)} (others: 1)")
    p.add_argument("--first-seed", type=int, default=0,
                   help="seeds run are first-seed .. first-seed + seeds - 1 (a part per seed merges into one table)")
    p.add_argument("--steps", type=int, default=320, help="steps per run (320 x 32 x 2 ranks = 1.02 epochs)")
    p.add_argument("--sweep-steps", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-every", type=int, default=40)
    p.add_argument("--train-size", type=int, default=20000)
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--num-samples", type=int, default=1024, help="Fisher examples (all ranks)")
    p.add_argument("--l0-steps", type=int, default=None, help="diff pruning's L0 steps (default: steps / 4)")
    p.add_argument("--lr", nargs="+", default=[], metavar="METHOD=LR", help="fix a method's lr")
    p.add_argument("--sweep", help="a transfer_sweep.json whose best lr per method --part final uses")
    p.add_argument("--tag", default="all",
                   help="--part final writes transfer_part_<tag>.json, --part sweep transfer_sweep_<tag>.json")
    p.add_argument("--merge", nargs="+", metavar="PART.json", help="join parts into transfer.{md,json}")
    p.add_argument("--quick", action="store_true",
                   help="1 seed, 30 steps of 16/rank, 4000/400 synsets, Fisher over 128, grid-middle lr")
    p.add_argument("--data-dir", help="task.data_dir (folder with WordNet's data.noun; default: the system's)")
    p.add_argument("--model-dir", help="task.model_dir (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--rate", default="1gbit")
    p.add_argument("--ranks", type=int, default=2, help="ranks (per node with --nodes)")
    p.add_argument("--nodes", type=int, default=1,
                   help="emulated nodes (cluster/box.py; root): N nodes x --ranks, each node's eth0 at --rate")
    p.add_argument("--no-namespace", action="store_true")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run (a torchrun of N runs gets N x this)")
    p.add_argument("--out", default=report.RESULTS)
    a = p.parse_args(argv)
    a.argv = argv
    if a.merge:
        return merge(a)
    if a.quick:
        a.seeds, a.steps, a.batch_size, a.eval_every = 1, 30, 16, 15
        a.train_size, a.test_size, a.num_samples = 4000, 400, 128
    if a.first_seed < 0 or a.seeds < 1:
        p.error(f"--first-seed {a.first_seed} / --seeds {a.seeds}: use --first-seed >= 0 and --seeds >= 1")
    netem.parse_rate(a.rate)
    unknown = [m for m in a.methods if m not in METHODS]
    retired = [m for m in unknown if parse(m)[0] in RETIRED]
    if retired:
        p.error(f"--methods {retired[0]}: {RETIRED[parse(retired[0])[0]]} is not a run of the app (its results in "
                f"results/transfer_checks.md were measured with the earlier per-rank worker); choose from {METHODS}")
    if unknown:
        p.error(f"--methods: unknown {unknown}; choose from {METHODS}")
    fixed = dict(kv.split("=", 1) for kv in a.lr)
    best = {}
    if a.sweep:
        with open(a.sweep) as f:
            best = json.load(f)["sweep"]["best"]
    if a.part == "sweep":
        a.steps = a.sweep_steps
    if a.l0_steps is None:
        a.l0_steps = max(1, a.steps // 4)
    settings = {k: getattr(a, k) for k in ("steps", "batch_size", "eval_every", "train_size", "test_size",
                                           "num_samples", "l0_steps", "rate", "ranks", "nodes", "seeds",
                                           "first_seed", "part")}
    settings.update(date=report.environment()["date"], cores=os.cpu_count(), grids={m: grid(m) for m in a.methods})
    if a.part == "sweep":
        runs = [{"method": m, "lr": lr, "seed": 0} for m in a.methods for lr in grid(m)]
    else:
        runs = [{"method": m, "lr": float(fixed.get(m, best.get(m, grid(m)[1]))), "seed": s}
                for m in a.methods for s in range(a.first_seed, a.first_seed + (a.seeds if m in SEEDED else 1))]
    t0 = time.monotonic()
    got, failures = run_part(runs, a, a.part)
    settings["elapsed_s"] = time.monotonic() - t0
    if got:
        settings["link"] = got[0]["link"]
    note = settings_note(settings) + f" {settings['elapsed_s'] / 60:.0f} min in all."
    if a.part == "sweep":
        table, best = sweep_table(got)
        top = [r for r in got if r["lr"] == best.get(r["method"])]
        name = "transfer_sweep" if a.tag == "all" else f"transfer_sweep_{a.tag}"
        return publish(top, a, name, "Transfer: learning-rate sweep", settings, failures,
                       sweep={"best": best, "table": table, "steps": a.steps, "grids": settings["grids"]},
                       note=note + " Rows: each method at its best lr.")
    name = "transfer_quick" if a.quick else f"transfer_part_{a.tag}"
    return publish(got, a, name, "Transfer: quick run" if a.quick else f"Transfer: part {a.tag}", settings,
                   failures, note=note + lr_note(a, fixed))


def lr_note(a, fixed: dict) -> str:
    """How the part's learning rates were chosen, for its note."""
    parts = []
    if a.sweep:
        parts.append(f"each method's best of the sweep {os.path.basename(a.sweep)} (the grid's middle where it has none)")
    else:
        parts.append("the grid's middle (no sweep given)")
    if fixed:
        parts.append("fixed by --lr: " + ", ".join(f"{m} {v}" for m, v in fixed.items()))
    return " Learning rates: " + "; ".join(parts) + "."


def join_sweeps(into: dict | None, sweep: dict, path: str) -> dict:
    """One sweep of several sweep parts (``--part sweep --tag T``): their rows and best lrs; the
    parts must have swept the same number of steps."""
    if into is None:
        return dict(sweep)
    if sweep["steps"] != into["steps"]:
        raise SystemExit(f"--merge: {path} swept {sweep['steps']} steps, an earlier sweep {into['steps']}; "
                         f"merge sweeps of one budget")
    return {**into, "best": {**into["best"], **sweep["best"]}, "grids": {**into["grids"], **sweep["grids"]},
            "table": into["table"] + "\n" + "\n".join(sweep["table"].splitlines()[2:])}


def merge(a) -> dict:
    """Join parts. ``PATH:m1,m2`` takes only those methods' runs from PATH; runs of one method
    must share one lr (a row is a method at one lr). ``--tag`` other than "all" names the output
    ``transfer_<tag>`` instead of ``transfer``."""
    runs, failures, sweep, settings, sources = [], [], None, None, []
    for item in a.merge:
        path, _, only = item.partition(":") if not os.path.exists(item) else (item, "", "")
        keep = set(only.split(",")) if only else None
        try:
            with open(path) as f:
                part = json.load(f)
        except (OSError, ValueError) as e:
            raise SystemExit(f"--merge: cannot read {path!r} ({e}); give transfer_part_<tag>.json files "
                             f"written by --part") from None
        if part.get("sweep"):
            sweep = join_sweeps(sweep, part["sweep"], path)
            continue
        settings = settings or part["settings"]
        taken = [r for r in part["runs"] if keep is None or r["method"] in keep]
        runs += taken
        failures += part.get("failures", [])
        sources.append(f"{os.path.basename(path)}" + (f" ({', '.join(sorted(keep))} only)" if keep else ""))
    if settings is None:
        raise SystemExit("--merge: no final part among the files (only a sweep?)")
    for method in {r["method"] for r in runs}:
        lrs = sorted({r["lr"] for r in runs if r["method"] == method})
        if len(lrs) > 1:
            raise SystemExit(f"--merge: {method} has runs at several lrs {lrs}; take one lr per method "
                             f"(PATH:method,... selects methods from a file)")
    note = settings_note(settings) + f" Merged from: {'; '.join(sources)}."
    name = "transfer" if a.tag == "all" else f"transfer_{a.tag}"
    return publish(runs, a, name, "Transfer: WordNet supersenses with MiniLM", settings, failures,
                   sweep=sweep, note=note)


if __name__ == "__main__":
    main()
