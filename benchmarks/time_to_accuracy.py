"""Time to accuracy: test accuracy against training wall-clock seconds and against bytes on the
wire, for dense DDP, fp16, PowerSGD rank 4, the FISH mask and a random mask of the same density,
on an emulated link (issue 4).

    python -m benchmarks.time_to_accuracy                       # digits, 1 Gbit, 2 ranks, 3 seeds
    python -m benchmarks.time_to_accuracy --quick               # 1 seed, 200 steps
    python -m benchmarks.time_to_accuracy --tasks digits glue   # also the MiniLM transfer task

Each method is one run of the app on the task (:mod:`benchmarks.drive`: the method's ``comm=``
option and ``mask=`` kind, an accuracy curve recorded at every evaluation, the clock stopped while
it evaluates). Same weights, batches and link for every method; settings follow the app's defaults
(``conf/``: 400 steps of 32 examples per rank, 20 dense steps at lr 3e-3 before the mask, masked
AdamW at lr 3e-2, density 0.5%, Fisher over 256 examples with the classifier head kept whole).
A task whose data is missing is skipped with the reason. Writes ``tta_<task>.{md,json}``,
``tta_<task>_time.png`` and ``tta_<task>_bytes.png`` to ``--out``. Targets: FISH at 0.5% within
1 point of dense's final accuracy, and above the random mask.
"""
from __future__ import annotations

import argparse
import importlib
import os
import statistics
import time

from benchmarks import harness, report
from cluster import netem

METHODS = ["dense", "fp16", "powersgd-r4", "fish", "random"]
LABELS = {"dense": "dense DDP", "fp16": "fp16 hook", "powersgd-r4": "PowerSGD rank 4", "fish": "FISH mask",
          "random": "random mask"}


def method_overrides(method: str, seed: int, task: str, a: argparse.Namespace) -> list[str]:
    """The app's run of ``method``: ``task=<task>``, its ``comm=`` option and ``mask=`` kind (the masked
    ones after ``--dense-steps`` dense steps, the task's head kept whole), constant lrs, evaluation
    every ``--eval-every`` steps; DDP's buffer broadcast off (the same bytes for every method)."""
    run = [f"task={task}", f"steps={a.steps}", f"batch_size={a.batch_size}", f"eval_every={a.eval_every}",
           f"seed={seed}", "schedule/lr=constant", f"optim.dense_lr={a.dense_lr}", f"optim.lr={a.lr}",
           "optim.weight_decay=0.0", f"logging.log_every={a.steps}", "save_model=false", "save_diff=false",
           "comm.sync_buffers=false"]
    if method in ("dense", "fp16"):
        return run + ["mask=dense", f"comm={method}"]
    if method.startswith("powersgd-r"):
        return run + ["mask=dense", "comm=powersgd", f"comm.rank={int(method.split('-r')[1])}"]
    if method in ("fish", "random"):
        kind = ["mask=fisher", f"mask.num_samples={a.num_samples}"] if method == "fish" else ["mask=random"]
        return run + [*kind, f"mask.density={a.density}", "schedule=dense_warmup",
                      f"schedule.dense_steps={a.dense_steps}", "comm=masked"]
    raise SystemExit(f"--methods {method}: use {', '.join(METHODS)} or powersgd-r<rank>")


def task_available(name: str, kwargs: dict) -> str | None:
    """None if ``sparsecomm.app.tasks.<name>`` builds here, else why not."""
    try:
        mod = importlib.import_module(f"sparsecomm.app.tasks.{name}")
        mod.build(**kwargs)
    except (ImportError, FileNotFoundError, ValueError, OSError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def summarize(runs: list[dict], threshold: float) -> list[dict]:
    rows = []
    for method in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == method]
        finals = [r["curve"][-1] for r in rs]
        reach_s = [report.reach(r, threshold, "seconds") for r in rs]
        reach_b = [report.reach(r, threshold, "wire_bytes_per_rank") for r in rs]
        rows.append({
            "method": method, "seeds": len(rs),
            "final_acc": statistics.mean(f["accuracy"] for f in finals),
            "final_accs": [f["accuracy"] for f in finals],
            "seconds": statistics.mean(f["seconds"] for f in finals),
            "wire_bytes_per_rank": statistics.mean(f["wire_bytes_per_rank"] for f in finals),
            "payload_bytes": statistics.mean(f["payload_bytes"] for f in finals),
            "reach_s": statistics.mean(reach_s) if None not in reach_s else None,
            "reach_bytes": statistics.mean(reach_b) if None not in reach_b else None,
            "k": rs[0].get("k"), "mask_s": statistics.mean(r["mask_s"] for r in rs) if "mask_s" in rs[0] else None,
        })
    return rows


def verdicts(rows: list[dict]) -> list[dict]:
    by = {r["method"]: r for r in rows}
    out = []
    fish, dense, rnd = by.get("fish"), by.get("dense"), by.get("random")
    if fish and dense:
        gap = (dense["final_acc"] - fish["final_acc"]) * 100
        out.append(report.verdict("FISH at 0.5% within 1 point of dense's final accuracy", gap <= 1.0,
                                  f"FISH {fish['final_acc']:.3f} vs dense {dense['final_acc']:.3f}: "
                                  f"{gap:+.1f} points behind" + ("" if gap <= 1 else f", over by {gap - 1:.1f}")))
    if fish and rnd:
        d = (fish["final_acc"] - rnd["final_acc"]) * 100
        out.append(report.verdict("FISH beats the random mask at the same density", d > 0,
                                  f"FISH {fish['final_acc']:.3f} vs random {rnd['final_acc']:.3f} ({d:+.1f} points)"))
    return out


def plots(task: str, runs: list[dict], out: str) -> list[str]:
    plt = report.pyplot()
    if plt is None:
        return []
    paths = []
    for key, xlabel, fname, logx in (("seconds", "training wall-clock seconds (rank 0)", f"tta_{task}_time.png", False),
                                     ("wire_bytes_per_rank", "bytes on the wire per rank", f"tta_{task}_bytes.png", True)):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for method in dict.fromkeys(r["method"] for r in runs):
            xs, ys = report.mean_curve([r for r in runs if r["method"] == method], key)
            if logx:
                xs, ys = zip(*[(x, y) for x, y in zip(xs, ys) if x > 0]) if any(x > 0 for x in xs) else ((), ())
            ax.plot(xs, ys, marker=".", label=LABELS.get(method, method))
        if logx:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{task}: accuracy vs {'time' if key == 'seconds' else 'bytes'} "
                     f"(mean of {len({r['seed'] for r in runs})} seeds)")
        ax.grid(alpha=0.3)
        ax.legend()
        paths.append(report.save_figure(plt, fig, out, fname))
    return paths


def columns(threshold: float) -> list[report.Column]:
    return [
        ("method", lambda r: LABELS.get(r["method"], r["method"])),
        ("final test acc", lambda r: f"{r['final_acc']:.3f}" + (
            f" ({', '.join(f'{a:.3f}' for a in r['final_accs'])})" if r["seeds"] > 1 else "")),
        ("training s", lambda r: report.fmt(r["seconds"])),
        ("wire MB/rank", lambda r: report.mb(r["wire_bytes_per_rank"])),
        ("payload MB/rank (ours)", lambda r: report.mb(r["payload_bytes"])),
        (f"s to {threshold:.0%}", lambda r: report.fmt(r["reach_s"])),
        (f"MB to {threshold:.0%}", lambda r: report.mb(r["reach_bytes"])),
        ("k", lambda r: f"{r['k']:,}" if r["k"] else None),
        ("mask s", lambda r: report.fmt(r["mask_s"])),
    ]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=["digits"])
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--rate", default="1gbit")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--dense-steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--density", type=float, default=0.005)
    p.add_argument("--lr", type=float, default=3e-2, help="masked phase")
    p.add_argument("--dense-lr", type=float, default=3e-3)
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--threshold", type=float, default=0.95, help="accuracy for the time/bytes-to-reach columns")
    p.add_argument("--quick", action="store_true", help="1 seed, 200 steps")
    p.add_argument("--no-namespace", action="store_true")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", default=report.RESULTS)
    a = p.parse_args(argv)
    if a.quick:
        a.seeds, a.steps = 1, 200
    netem.parse_rate(a.rate)
    results = {}
    workdir = os.path.join(a.out, "tmp")
    os.makedirs(workdir, exist_ok=True)
    for task in a.tasks:
        why = task_available(task, {})
        if why:
            print(f"{task}: skipped ({why})")
            results[task] = {"skipped": why}
            continue
        t0 = time.monotonic()
        spec = {"model": task, "meter": "curve", "tx_path": "/sys/class/net/lo/statistics/tx_bytes",
                "variants": [{"id": f"{method}-s{seed}", "method": method, "seed": seed,
                              "overrides": method_overrides(method, seed, task, a)}
                             for seed in range(a.seeds) for method in a.methods]}
        with netem.Link(a.rate, isolate=not a.no_namespace) as link:
            if link.fallback:
                print(f"WARNING: {link.fallback}")
            print(f"{task}: {len(a.methods)} methods x {a.seeds} seeds on {a.ranks} ranks, link {link.label}", flush=True)
            runs, failures = harness.launch(link, a.ranks, spec, workdir=workdir, timeout=a.timeout,
                                            echo=lambda s: print(s, flush=True))
            label, note = link.label, link.fallback or ""
        rc, tail = (1 if failures else 0), "\n".join(f"{k}: {v}" for k, v in failures.items())
        if rc != 0:
            print(f"{task}: {len(failures)} run(s) failed:\n{tail}")
        rows = summarize(runs, a.threshold)
        vds = verdicts(rows)
        res = {"command": report.command_line(__file__, argv), "environment": report.environment(), "link": label,
               "link_note": note, "world_size": a.ranks, "settings": {k: v for k, v in vars(a).items() if k != "out"},
               "rows": rows, "runs": runs, "verdicts": vds, "exit_code": rc,
               "elapsed_s": time.monotonic() - t0, "error_tail": tail if rc else ""}
        text = (f"Command: `{res['command']}`  \n{a.ranks} ranks on a {label} link"
                + (f" ({note})" if note else "") + f", {a.seeds} seed(s) x {a.steps} steps of {a.batch_size}/rank, "
                f"density {a.density:g}; {res['environment']['date']}, {res['elapsed_s']:.0f} s in all.\n\n"
                + report.md_table(rows, columns(a.threshold)) + "\n\n" + report.verdicts_md(vds)
                + (f"\n\nThe worker failed (exit {rc}); rows above are the methods that finished." if rc else ""))
        report.publish(a.out, f"tta_{task}", f"Time to accuracy: {task}", res, text)
        res["plots"] = plots(task, runs, a.out) if runs else []
        print()
        print(report.md_table(rows, columns(a.threshold)))
        report.print_verdicts(vds)
        results[task] = res
    harness.remove_workdir(workdir)
    return results


if __name__ == "__main__":
    main()
