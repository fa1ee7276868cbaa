"""Fine-tuning masks head to head, each method at its own learning rate (the app's own runs).

For every task and method: a learning-rate sweep at the full budget (seed 0), then seeds 1 and 2
at the sweep's best, then the masks again at 2% density at that learning rate. With ``--rate``,
each (task, method) also runs once more at its chosen rate (seed 0) inside an emulated link of that
rate (:mod:`cluster.netem`, root), evaluated every ``--eval-every`` steps: the seconds and bytes it
took to reach 95% of dense's accuracy (mean of its seeds), evaluation taken out of the clock.

Every run is ``sparsecomm-train`` (``python -m sparsecomm.app.train``) with the overrides its row
records, in its own run folder under ``--runs``; a run whose ``summary.json`` is there is not run
again, so an interrupted protocol resumes where it stopped. A method is a comm option at
``optim.dense_lr`` (``dense``: DDP's all-reduce; ``powersgd``: torch's PowerSGD hook, rank 4) or a
mask kind under ``comm=masked`` at ``optim.lr``. Results: ``<out>/fine_tuning_protocol.{md,json}``.

    python -m benchmarks.fine_tuning_protocol                          # MiniLM on both WordNet tasks
    python -m benchmarks.fine_tuning_protocol --methods dense random --tasks wordnet
    sudo .venv/bin/python -m benchmarks.fine_tuning_protocol --rate 1gbit   # and the time to 95% of dense
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import report
from cluster import netem

# One epoch of 4,000 examples on 2 ranks, mask at step 0, a constant learning rate.
BUDGET = ["schedule=fish_fixed", "schedule/lr=constant", "batch_size=16", "steps=125", "task.train_size=4000",
          "task.test_size=600", "save_model=false", "save_diff=false", "logging.progress=false"]
LRS = {"dense": [3e-5, 1e-4, 3e-4], "powersgd": [1e-4, 3e-4, 1e-3], "random": [1e-3, 3e-3, 1e-2],
       "fisher_scaled": [1e-3, 3e-3, 1e-2], "token_rows": [1e-3, 3e-3, 1e-2]}
# methods that are a comm option (every entry trains, at optim.dense_lr); any other is a mask kind
COMM_METHODS = {"dense": ["comm=dense"], "powersgd": ["comm=powersgd", "comm.rank=4"]}
FISHER_FAMILY = ("fisher", "fisher_scaled", "token_rows", "learned")  # scores built on squared gradients
NAME = re.compile(r"(?P<task>\w+?)-(?P<method>\w+)-lr(?P<lr>[0-9.e+-]+)-s(?P<seed>\d+)-d(?P<density>[0-9.]+)"
                  r"(?:-at(?P<rate>\w+))?")
OF_DENSE = 0.95  # the time-to-accuracy threshold: this fraction of dense's mean test accuracy


def run_name(task: str, method: str, lr: float, seed: int, density: float, rate: str | None = None) -> str:
    return f"{task}-{method}-lr{lr:g}-s{seed}-d{density:g}" + (f"-at{rate}" if rate else "")


def method_overrides(method: str, lr: float, density: float) -> list[str]:
    if method in COMM_METHODS:
        return [*COMM_METHODS[method], f"optim.dense_lr={lr:g}"]
    return ["comm=masked", f"mask={method}", f"optim.lr={lr:g}", f"mask.density={density:g}"]


class Protocol:
    """Runs of the app under ``runs``, each started once; ``budget`` is every run's common overrides.
    ``link`` (a :class:`cluster.netem.Link`, entered) and ``eval_every``: where timed runs go."""

    def __init__(self, runs: Path, budget: list[str], link=None, eval_every: int = 25):
        self.runs, self.budget, self.link, self.eval_every = runs, budget, link, eval_every

    def run(self, task: str, method: str, lr: float, seed: int = 0, density: float = 0.005,
            timed: bool = False) -> float | None:
        """The run's test accuracy (None if it failed: its log says why). ``timed``: the run inside
        the link, evaluated every ``eval_every`` steps (and logged at each evaluation)."""
        name = run_name(task, method, lr, seed, density, self.link.label if timed else None)
        summary = self.runs / name / "summary.json"
        if not summary.exists():
            args = [*self.budget, f"task={task}", f"seed={seed}", *method_overrides(method, lr, density),
                    f"out_dir={self.runs}", f"run_id={name}"]
            cmd, env = [sys.executable, "-m", "sparsecomm.app.train", *args], None
            if timed:
                cmd = self.link.wrap([*cmd, f"eval_every={self.eval_every}", f"logging.log_every={self.eval_every}"])
                env = self.link.env(os.environ)
            t0 = time.monotonic()
            with open(self.runs / f"{name}.log", "w") as log:
                rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
            print(f"{name}: exit {rc}, {time.monotonic() - t0:.0f} s", flush=True)
            if not summary.exists():
                return None
        return json.loads(summary.read_text())["test_acc"]

    def best_lr(self, task: str, method: str, lrs: list[float]) -> float | None:
        accs = {lr: acc for lr in lrs if (acc := self.run(task, method, lr)) is not None}
        return max(accs, key=lambda lr: (accs[lr], -lr)) if accs else None  # a tie goes to the smaller lr


def collect(runs: Path) -> list[dict]:
    """Every finished run under ``runs``: its name's fields and its summary's accuracy and bytes;
    a timed run (``rate`` set) also its evaluations (``metrics.jsonl``)."""
    out = []
    for path in sorted(runs.glob("*/summary.json")):
        m = NAME.fullmatch(path.parent.name)
        if m is None:
            continue
        s = json.loads(path.read_text())
        run = {"task": m["task"], "method": m["method"], "lr": float(m["lr"]), "seed": int(m["seed"]),
               "density": float(m["density"]), "rate": m["rate"], "test_acc": s["test_acc"],
               "bytes_sent": s["bytes_sent"], "mask_bytes": s.get("mask_score_bytes") or 0,
               "dense_bytes": s["dense_bytes"], "train_s": s["train_s"], "k": s.get("k")}
        if m["rate"]:
            with open(path.parent / "metrics.jsonl") as f:
                run["records"] = [json.loads(line) for line in f if line.strip()]
        out.append(run)
    return out


def time_to(records: list[dict], threshold: float, mask_bytes: int = 0) -> tuple[float, float] | None:
    """(seconds, bytes per rank) when a run's test accuracy first reached ``threshold``, or None.

    Seconds are the run's clock at that evaluation less every evaluation's own time up to it; bytes
    are what the hook sent by then (the last train record at or before that step, so log at each
    evaluation) plus ``mask_bytes``, the whole run's cost of choosing its mask."""
    evaluating, sent = 0.0, 0
    for r in records:
        if r["event"] == "train":
            sent = r["bytes_sent"]
        elif r["event"] == "eval":
            evaluating += r["seconds"]
            if r["test_acc"] >= threshold:
                return r["time"] - evaluating, sent + mask_bytes
    return None


def timed_rows(runs: list[dict], rows: list[dict]) -> list[dict]:
    """Per task, each timed run at its method's chosen lr: when it reached 95% of dense's mean."""
    out = []
    for task in sorted({r["task"] for r in rows}):
        dense = [r for r in rows if r["task"] == task and r["method"] == "dense"]
        if not dense:
            continue
        threshold = OF_DENSE * dense[0]["mean"]
        for row in (r for r in rows if r["task"] == task and r["density"] in (None, 0.005)):
            for run in (r for r in runs if r["rate"] and (r["task"], r["method"], r["lr"], r["seed"], r["density"]) ==
                        (task, row["method"], row["lr"], 0, 0.005)):
                reached = time_to(run["records"], threshold, run["mask_bytes"])
                # the last evaluation is the final one, after the training clock (train_s) stopped
                evaluating = sum([r["seconds"] for r in run["records"] if r["event"] == "eval"][:-1])
                out.append({"task": task, "method": row["method"], "lr": row["lr"], "rate": run["rate"],
                            "threshold": threshold, "test_acc": run["test_acc"],
                            "seconds_to": None if reached is None else reached[0],
                            "mb_to": None if reached is None else reached[1] / 1e6,
                            "train_s": run["train_s"] - evaluating,
                            "wire_mb": (run["bytes_sent"] + run["mask_bytes"]) / 1e6})
    return out


def rows_of(runs: list[dict], chosen: dict[tuple[str, str], float]) -> list[dict]:
    """One row per (task, method, density) at the chosen lr: accuracy over its seeds, bytes."""
    rows = []
    for (task, method), lr in sorted(chosen.items()):
        for density in (0.005, 0.02):
            mine = sorted((r for r in runs if (r["task"], r["method"], r["lr"], r["density"]) == (task, method, lr, density)
                           and not r["rate"]), key=lambda r: r["seed"])
            if not mine:
                continue
            accs = [r["test_acc"] for r in mine]
            sent = mine[0]["bytes_sent"] + mine[0]["mask_bytes"]
            rows.append({"task": task, "method": method, "density": None if method in COMM_METHODS else density, "lr": lr,
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
        masks = {m: r for m, r in at.items() if m not in COMM_METHODS}
        if "dense" in at and masks:
            m, r = max(masks.items(), key=lambda kv: kv[1]["mean"])
            gap = 100 * (r["mean"] - at["dense"]["mean"])
            out.append(report.verdict(f"{task}: the best 0.5% mask within 1 point of dense (3 seeds)", gap >= -1,
                                      f"{m} {r['mean']:.3f} vs dense {at['dense']['mean']:.3f} ({gap:+.1f})"))
            out.append(report.verdict(f"{task}: the best 0.5% mask sends at most 1% of dense's bytes",
                                      r["of_dense"] <= 0.01, f"{m}: {r['of_dense']:.2%} (its mask's choice included)"))
    return out


def time_verdicts(rows: list[dict], timed: list[dict]) -> list[dict]:
    """Per task: is the most accurate 0.5% mask (3 seeds) the fastest of all timed methods to 95% of dense?"""
    out = []
    for task in sorted({t["task"] for t in timed}):
        masks = [r for r in rows if r["task"] == task and r["density"] == 0.005 and len(r["accs"]) == 3]
        reached = [t for t in timed if t["task"] == task and t["seconds_to"] is not None]
        if not masks or not reached:
            continue
        best = max(masks, key=lambda r: r["mean"])["method"]
        fastest = min(reached, key=lambda t: t["seconds_to"])
        mine = next((t for t in timed if t["task"] == task and t["method"] == best), None)
        took = "never" if mine is None or mine["seconds_to"] is None else f"{mine['seconds_to']:.0f} s"
        out.append(report.verdict(f"{task}: the best 0.5% mask the fastest of all methods to {OF_DENSE:.0%} of dense "
                                  f"at {fastest['rate']}", fastest["method"] == best,
                                  f"{best}: {took}; fastest {fastest['method']} {fastest['seconds_to']:.0f} s"))
    return out


def sweep_md(runs: list[dict], chosen: dict[tuple[str, str], float]) -> str:
    lines = ["| task | method | test accuracy at each lr, seed 0, 0.5% (the chosen lr in bold) |", "|---|---|---|"]
    for (task, method), best in sorted(chosen.items()):
        accs = sorted((r["lr"], r["test_acc"]) for r in runs
                      if (r["task"], r["method"], r["seed"], r["density"]) == (task, method, 0, 0.005) and not r["rate"])
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
               color=["0.5" if r["method"] in COMM_METHODS else "C0" for r in mine])
        for x, r in zip(xs, mine):
            ax.annotate(f"{r['wire_mb'] + r['mask_mb']:,.0f} MB", (x, r["mean"]), textcoords="offset points",
                        xytext=(0, 8), ha="center", fontsize=8)
        ax.set_xticks(list(xs), [r["method"] for r in mine], rotation=15)
        low = min(r["mean"] for r in mine)
        ax.set_ylim(max(0.0, low - 0.1), max(r["mean"] for r in mine) + 0.05)
        ax.set_title(f"{task}: test accuracy, {len(mine[0]['accs'])} seeds (MB/rank sent)", fontsize=9)
    return [report.save_figure(plt, fig, out, "fine_tuning_protocol.png")]


def _seconds(t: dict) -> str:
    return "never" if t["seconds_to"] is None else f"{t['seconds_to']:.0f}"


TIME_COLUMNS = [("task", lambda t: t["task"]), ("method", lambda t: t["method"]), ("lr", lambda t: f"{t['lr']:g}"),
                ("link", lambda t: t["rate"]), ("test acc (seed 0)", lambda t: f"{t['test_acc']:.3f}"),
                ("s to 95% of dense", _seconds),
                ("MB/rank to there", lambda t: "-" if t["mb_to"] is None else f"{t['mb_to']:,.1f}"),
                ("training s", lambda t: f"{t['train_s']:.0f}"), ("MB/rank sent", lambda t: f"{t['wire_mb']:,.1f}")]

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
    ap.add_argument("--methods", nargs="+", default=list(LRS), help=f"comm options ({', '.join(COMM_METHODS)}) or mask kinds (default: {' '.join(LRS)})")
    ap.add_argument("--lrs", nargs="+", type=float, help="every method's sweep (default: per method, LRS)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds at the chosen lr (0 is the sweep's)")
    ap.add_argument("--no-density", action="store_true", help="skip the masks at 2%% density")
    ap.add_argument("--budget", nargs="*", help="the overrides every run shares (default: one MiniLM epoch, BUDGET)")
    ap.add_argument("--rate", help="also time each method (seed 0, its chosen lr) inside an emulated link of this "
                                   "rate (root; e.g. 1gbit): seconds and bytes to 95%% of dense")
    ap.add_argument("--eval-every", type=int, default=25, help="the timed runs' evaluations (steps)")
    ap.add_argument("--runs", default="outputs/fine_tuning_protocol", help="where the run folders go")
    ap.add_argument("--out", default=report.RESULTS)
    args = ap.parse_args(argv)
    runs = Path(args.runs).resolve()
    runs.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        link = stack.enter_context(netem.Link(args.rate, allow_fallback=False)) if args.rate else None
        protocol = Protocol(runs, BUDGET if args.budget is None else args.budget, link, args.eval_every)
        chosen = run_protocol(protocol, args)
    if not chosen:  # nothing to publish: the results page stays as it was
        print(f"error: no method finished a run (logs in {runs})", file=sys.stderr)
        return 1
    found = collect(runs)
    rows = rows_of(found, chosen)
    timed = timed_rows(found, rows)
    explanation = ("The learning-rate sweep:\n\n" + sweep_md(found, chosen) +
                   f"\n\nEvery run: `sparsecomm-train {' '.join(protocol.budget)} task=<task> seed=<seed>` plus "
                   "`comm=dense optim.dense_lr=<lr>`, `comm=powersgd comm.rank=4 optim.dense_lr=<lr>` or "
                   "`comm=masked mask=<kind> optim.lr=<lr> mask.density=<d>`; "
                   "'of dense's bytes' counts the mask's choice (score exchange, refreshes) with the training's.")
    if timed:
        explanation += (f"\n\nTime to {OF_DENSE:.0%} of dense's mean test accuracy: each method once more at its "
                        f"chosen lr (seed 0) inside an emulated link (`tc tbf`, `cluster/netem.py`), evaluated every "
                        f"{args.eval_every} steps (`eval_every={args.eval_every} logging.log_every={args.eval_every}`); "
                        "seconds on the run's clock from its start (the mask's choice included) less its "
                        "evaluations; MB what the hook had sent by then plus the mask's choice:\n\n"
                        + report.md_table(timed, TIME_COLUMNS))
    os.makedirs(args.out, exist_ok=True)
    plots = plot(rows, args.out)
    explanation += "".join(f"\n\n![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots)
    report.publish_measurements(args.out, "fine_tuning_protocol", "Fine-tuning masks at their own learning rates",
                                __file__, argv, rows, COLUMNS, verdicts_of(rows) + time_verdicts(rows, timed),
                                explanation=explanation, extra={"timed": timed})
    print(report.md_table(rows, COLUMNS))
    if timed:
        print("\n" + report.md_table(timed, TIME_COLUMNS))
    print(f"\nwrote {args.out}/fine_tuning_protocol.md, fine_tuning_protocol.json")
    return 0


def run_protocol(protocol: Protocol, args) -> dict[tuple[str, str], float]:
    """Every run the arguments ask for (each started once); each (task, method)'s chosen lr."""
    chosen = {}
    for task in args.tasks:
        for method in args.methods:
            lr = protocol.best_lr(task, method, args.lrs or LRS.get(method, LRS["random"]))
            if lr is None:
                print(f"{task} {method}: every sweep run failed (logs in {protocol.runs})", file=sys.stderr)
                continue
            chosen[(task, method)] = lr
            for seed in range(1, args.seeds):
                protocol.run(task, method, lr, seed)
            if method not in COMM_METHODS and not args.no_density:
                protocol.run(task, method, lr, 0, 0.02)
    if protocol.link is not None:
        for (task, method), lr in chosen.items():
            protocol.run(task, method, lr, timed=True)
    return chosen


if __name__ == "__main__":
    sys.exit(main())
