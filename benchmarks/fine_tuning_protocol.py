"""Fine-tuning masks head to head, each method at its own learning rate (the app's own runs).

For every task and method: a learning-rate sweep at the full budget (seed 0), then seeds 1 and 2
at the sweep's best, then the masks again at 2% density at that learning rate. Every run is
``sparsecomm-train`` (``python -m sparsecomm.app.train``) with the overrides its row records, in
its own run folder under ``--runs``; a run whose ``summary.json`` is there is not run again, so an
interrupted protocol resumes where it stopped. Dense DDP is ``comm=dense`` at ``optim.dense_lr``;
a mask kind is ``comm=masked`` at ``optim.lr``. Results: ``<out>/fine_tuning_protocol.{md,json}``.

    python -m benchmarks.fine_tuning_protocol                          # MiniLM on both WordNet tasks
    python -m benchmarks.fine_tuning_protocol --methods dense random --tasks wordnet
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import report

# One epoch of 4,000 examples on 2 ranks, mask at step 0, a constant learning rate.
BUDGET = ["schedule=fish_fixed", "schedule/lr=constant", "batch_size=16", "steps=125", "task.train_size=4000",
          "task.test_size=600", "save_model=false", "save_diff=false", "logging.progress=false"]
LRS = {"dense": [3e-5, 1e-4, 3e-4], "random": [1e-3, 3e-3, 1e-2], "fisher_scaled": [1e-3, 3e-3, 1e-2],
       "token_rows": [1e-3, 3e-3, 1e-2]}
FISHER_FAMILY = ("fisher", "fisher_scaled", "token_rows", "learned", "lottery")
NAME = re.compile(r"(?P<task>\w+?)-(?P<method>\w+)-lr(?P<lr>[0-9.e+-]+)-s(?P<seed>\d+)-d(?P<density>[0-9.]+)")


def run_name(task: str, method: str, lr: float, seed: int, density: float) -> str:
    return f"{task}-{method}-lr{lr:g}-s{seed}-d{density:g}"


class Protocol:
    """Runs of the app under ``runs``, each started once; ``budget`` is every run's common overrides."""

    def __init__(self, runs: Path, budget: list[str]):
        self.runs, self.budget = runs, budget

    def run(self, task: str, method: str, lr: float, seed: int = 0, density: float = 0.005) -> float | None:
        """The run's test accuracy (None if it failed: its log says why)."""
        name = run_name(task, method, lr, seed, density)
        summary = self.runs / name / "summary.json"
        if not summary.exists():
            choice = (["comm=dense", f"optim.dense_lr={lr:g}"] if method == "dense" else
                      ["comm=masked", f"mask={method}", f"optim.lr={lr:g}", f"mask.density={density:g}"])
            args = [*self.budget, f"task={task}", f"seed={seed}", *choice, f"out_dir={self.runs}", f"run_id={name}"]
            t0 = time.monotonic()
            with open(self.runs / f"{name}.log", "w") as log:
                rc = subprocess.run([sys.executable, "-m", "sparsecomm.app.train", *args], stdout=log,
                                    stderr=subprocess.STDOUT).returncode
            print(f"{name}: exit {rc}, {time.monotonic() - t0:.0f} s", flush=True)
            if not summary.exists():
                return None
        return json.loads(summary.read_text())["test_acc"]

    def best_lr(self, task: str, method: str, lrs: list[float]) -> float | None:
        accs = {lr: acc for lr in lrs if (acc := self.run(task, method, lr)) is not None}
        return max(accs, key=lambda lr: (accs[lr], -lr)) if accs else None  # a tie goes to the smaller lr


def collect(runs: Path) -> list[dict]:
    """Every finished run under ``runs``: its name's fields and its summary's accuracy and bytes."""
    out = []
    for path in sorted(runs.glob("*/summary.json")):
        m = NAME.fullmatch(path.parent.name)
        if m is None:
            continue
        s = json.loads(path.read_text())
        out.append({"task": m["task"], "method": m["method"], "lr": float(m["lr"]), "seed": int(m["seed"]),
                    "density": float(m["density"]), "test_acc": s["test_acc"], "bytes_sent": s["bytes_sent"],
                    "mask_bytes": s.get("mask_score_bytes") or 0, "dense_bytes": s["dense_bytes"],
                    "train_s": s["train_s"], "k": s.get("k")})
    return out


def rows_of(runs: list[dict], chosen: dict[tuple[str, str], float]) -> list[dict]:
    """One row per (task, method, density) at the chosen lr: accuracy over its seeds, bytes."""
    rows = []
    for (task, method), lr in sorted(chosen.items()):
        for density in (0.005, 0.02):
            mine = sorted((r for r in runs if (r["task"], r["method"], r["lr"], r["density"]) == (task, method, lr, density)),
                          key=lambda r: r["seed"])
            if not mine:
                continue
            accs = [r["test_acc"] for r in mine]
            sent = mine[0]["bytes_sent"] + mine[0]["mask_bytes"]
            rows.append({"task": task, "method": method, "density": None if method == "dense" else density, "lr": lr,
                         "seeds": [r["seed"] for r in mine], "accs": accs, "mean": statistics.mean(accs),
                         "sd": statistics.stdev(accs) if len(accs) > 1 else None,
                         "wire_mb": mine[0]["bytes_sent"] / 1e6, "mask_mb": mine[0]["mask_bytes"] / 1e6,
                         "of_dense": sent / mine[0]["dense_bytes"]})
    return rows


def verdicts_of(rows: list[dict]) -> list[dict]:
    out = []
    for task in sorted({r["task"] for r in rows}):
        at = {r["method"]: r for r in rows if r["task"] == task and r["density"] in (None, 0.005) and len(r["accs"]) == 3}
        family = {m: r for m, r in at.items() if m in FISHER_FAMILY}
        if "random" in at and family:
            m, r = max(family.items(), key=lambda kv: kv[1]["mean"])
            gap = 100 * (r["mean"] - at["random"]["mean"])
            out.append(report.verdict(f"{task}: a Fisher-family 0.5% mask >= 1 point above random 0.5% (3 seeds)",
                                      gap >= 1, f"best {m} {r['mean']:.3f} vs random {at['random']['mean']:.3f} ({gap:+.1f})"))
        masks = {m: r for m, r in at.items() if m != "dense"}
        if "dense" in at and masks:
            m, r = max(masks.items(), key=lambda kv: kv[1]["mean"])
            gap = 100 * (r["mean"] - at["dense"]["mean"])
            out.append(report.verdict(f"{task}: the best 0.5% mask within 1 point of dense (3 seeds)", gap >= -1,
                                      f"{m} {r['mean']:.3f} vs dense {at['dense']['mean']:.3f} ({gap:+.1f})"))
            out.append(report.verdict(f"{task}: the best 0.5% mask sends at most 1% of dense's bytes",
                                      r["of_dense"] <= 0.01, f"{m}: {r['of_dense']:.2%} (its mask's choice included)"))
    return out


def sweep_md(runs: list[dict], chosen: dict[tuple[str, str], float]) -> str:
    lines = ["| task | method | test accuracy at each lr, seed 0, 0.5% (the chosen lr in bold) |", "|---|---|---|"]
    for (task, method), best in sorted(chosen.items()):
        accs = sorted((r["lr"], r["test_acc"]) for r in runs
                      if (r["task"], r["method"], r["seed"], r["density"]) == (task, method, 0, 0.005))
        cells = ", ".join(f"**{lr:g}: {a:.3f}**" if lr == best else f"{lr:g}: {a:.3f}" for lr, a in accs)
        lines.append(f"| {task} | {method} | {cells} |")
    return "\n".join(lines)


def plot(rows: list[dict], out: str) -> list[str]:
    """``fine_tuning_protocol.png``: test accuracy (mean ± sd over the seeds) of each method at 0.5% (and
    dense) per task, each bar labelled with its MB per rank on the wire; [] without matplotlib."""
    plt = report.pyplot()
    if plt is None:
        return []
    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        mine = [r for r in rows if r["task"] == task and r["density"] in (None, 0.005)]
        xs = range(len(mine))
        ax.bar(xs, [r["mean"] for r in mine], yerr=[r["sd"] or 0 for r in mine], capsize=4,
               color=["0.5" if r["method"] == "dense" else "C0" for r in mine])
        for x, r in zip(xs, mine):
            ax.annotate(f"{r['wire_mb'] + r['mask_mb']:,.0f} MB", (x, r["mean"]), textcoords="offset points",
                        xytext=(0, 8), ha="center", fontsize=8)
        ax.set_xticks(list(xs), [r["method"] for r in mine], rotation=15)
        low = min(r["mean"] for r in mine)
        ax.set_ylim(max(0.0, low - 0.1), max(r["mean"] for r in mine) + 0.05)
        ax.set_title(f"{task}: test accuracy, {len(mine[0]['accs'])} seeds (MB/rank sent)", fontsize=9)
    return [report.save_figure(plt, fig, out, "fine_tuning_protocol.png")]


COLUMNS = [("task", lambda r: r["task"]), ("method", lambda r: r["method"]),
           ("density", lambda r: "-" if r["density"] is None else f"{r['density']:.1%}"),
           ("lr", lambda r: f"{r['lr']:g}"),
           ("test acc (mean ± sd)", lambda r: f"{r['mean']:.3f}" + ("" if r["sd"] is None else f" ± {r['sd']:.3f}")),
           ("seeds", lambda r: ", ".join(f"{a:.3f}" for a in r["accs"])),
           ("wire MB/rank", lambda r: f"{r['wire_mb']:,.1f}"), ("mask MB/rank", lambda r: f"{r['mask_mb']:.2f}"),
           ("of dense's bytes", lambda r: f"{r['of_dense']:.2%}")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=["wordnet", "verb_examples"])
    ap.add_argument("--methods", nargs="+", default=list(LRS), help=f"dense or mask kinds (default: {' '.join(LRS)})")
    ap.add_argument("--lrs", nargs="+", type=float, help="every method's sweep (default: per method, LRS)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds at the chosen lr (0 is the sweep's)")
    ap.add_argument("--no-density", action="store_true", help="skip the masks at 2%% density")
    ap.add_argument("--budget", nargs="*", help="the overrides every run shares (default: one MiniLM epoch, BUDGET)")
    ap.add_argument("--runs", default="outputs/fine_tuning_protocol", help="where the run folders go")
    ap.add_argument("--out", default=report.RESULTS)
    args = ap.parse_args(argv)
    runs = Path(args.runs).resolve()
    runs.mkdir(parents=True, exist_ok=True)
    protocol = Protocol(runs, BUDGET if args.budget is None else args.budget)
    chosen = {}
    for task in args.tasks:
        for method in args.methods:
            lr = protocol.best_lr(task, method, args.lrs or LRS.get(method, LRS["random"]))
            if lr is None:
                print(f"{task} {method}: every sweep run failed (logs in {runs})", file=sys.stderr)
                continue
            chosen[(task, method)] = lr
            for seed in range(1, args.seeds):
                protocol.run(task, method, lr, seed)
            if method != "dense" and not args.no_density:
                protocol.run(task, method, lr, 0, 0.02)
    found = collect(runs)
    rows = rows_of(found, chosen)
    explanation = ("The learning-rate sweep:\n\n" + sweep_md(found, chosen) +
                   f"\n\nEvery run: `sparsecomm-train {' '.join(protocol.budget)} task=<task> seed=<seed>` plus "
                   "`comm=dense optim.dense_lr=<lr>` or `comm=masked mask=<kind> optim.lr=<lr> mask.density=<d>`; "
                   "'of dense's bytes' counts the mask's choice (score exchange, refreshes) with the training's.")
    os.makedirs(args.out, exist_ok=True)
    plots = plot(rows, args.out)
    explanation += "".join(f"\n\n![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots)
    report.publish_measurements(args.out, "fine_tuning_protocol", "Fine-tuning masks at their own learning rates",
                                __file__, argv, rows, COLUMNS, verdicts_of(rows), explanation=explanation)
    print(report.md_table(rows, COLUMNS))
    print(f"\nwrote {args.out}/fine_tuning_protocol.md, fine_tuning_protocol.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
