"""Peak memory of choosing a mask and of training: sparsecomm against dense DDP + AdamW (issue 13).

    python -m benchmarks.memory                                   # 128 MiB and 1 GiB MLPs, every row
    python -m benchmarks.memory --sizes-mib 128 1024 4096 --dense-max-mib 1024
    sudo python -m benchmarks.memory --headline --cap-gib 8       # + the 2-rank fit in a capped cgroup
    python -m benchmarks.memory --render-only                     # tables, verdicts, plot from memory.json

The model is an MLP of 8 ``nn.Linear(w, w)`` layers (fp32, w chosen for the size), classifying
its own w outputs; the data is one random batch. Every measurement runs in a FRESH Python process
(``--worker``): it builds the model, resets the kernel's peak-RSS counter (``/proc/self/clear_refs``
``5``; ``resource.getrusage`` where that is unavailable), reads the current RSS, runs the step
under test and reports ``VmHWM - RSS before``: the peak extra resident memory the step needed on
top of the model. On a CUDA device the same is read from ``torch.cuda.max_memory_allocated``.
Rows (``--steps`` steps each for the training rows, one Gloo rank, density 0.5%); the training rows
are the app's own run (``task=synthetic`` with this MLP; the overrides are in each row of the JSON),
measured less the model and the examples the task holds:

    random_mask            sparsecomm.random_mask (streamed top-k)
    fisher_mask            sparsecomm.fisher_mask, layers engine, 64 examples
    concat (before)        the previous random_mask: every score as float64, concatenated
    ddp                    comm=dense mask=dense optim=sgd (no momentum: no optimizer state):
                           DDP's own share (its gradient buckets)
    sparsecomm             comm=masked mask=random + MaskedAdamW
    pipeline               comm=masked mask=fisher (64 examples): what a FISH run needs at its peak
    dense, bucket view     comm=dense mask=dense + torch.optim.AdamW (the app's DDP views its
                           gradients in the buckets)
    dense                  DDP with torch's defaults + AdamW: earlier results only

``--headline`` fits ``peak RSS of a rank = a + b x model bytes`` to the pipeline and to the best
dense row, predicts the largest model that 2 ranks fit in the machine's memory (MemTotal less
``--reserve-gib``) and in the cap, and checks the prediction: both 2-rank runs (fisher_mask + 5
masked steps; DDP + AdamW 5 steps) launched inside a memory cgroup capped at ``--cap-gib`` (the
OOM killer then stops only them), at 0.95x (``--verify-at``) the sparsecomm bound, where dense must
not fit, and at 0.95x the dense bound. Root is needed for the cgroup (v2 ``memory.max`` or v1
``memory.limit_in_bytes``).

Modules: :mod:`benchmarks.memory_worker` (one figure in a fresh process), :mod:`benchmarks.memory_run`
(starting those processes, the cgroup), :mod:`benchmarks.memory_report` (tables, verdicts, plot).
"""
from __future__ import annotations

import argparse
import json
import os
import time

from benchmarks import report
from benchmarks.memory_report import render
from benchmarks.memory_run import Cage, meminfo_bytes, run_fresh
from benchmarks.memory_worker import GIB, LABELS, MIB, RECORDED, ROWS, model_bytes, width_for

SPEC_EXTRA: dict = {}  # set from the command line for every worker (e.g. glibc_default)


def measure_sizes(sizes_mib, *, steps: int, density: float, dense_max_mib: float, concat_max_mib: float,
                  threads: int, batch: int, fisher_samples: int, device: str, rows_wanted=ROWS,
                  echo=print) -> list[dict]:
    rows = []
    for mib in sizes_mib:
        w = width_for(mib)
        for what in (r for r in ROWS if r in rows_wanted):
            if what in ("dense", "dense_bv") and mib > dense_max_mib:
                echo(f"  {mib:g} MiB {what}: skipped (--dense-max-mib {dense_max_mib:g})")
                continue
            if what == "concat" and mib > concat_max_mib:
                continue
            spec = {"width": w, "what": what, "steps": steps, "density": density, "threads": threads,
                    "batch": batch, "fisher_samples": fisher_samples, "device": device, **SPEC_EXTRA}
            res = run_fresh(spec)
            if not res["ok"]:
                echo(f"  {mib:g} MiB {what}: FAILED rc={res['rc']}\n{res['tail']}")
                rows.append({"what": what, "width": w, "model_bytes": model_bytes(w), "failed": res["tail"][-400:]})
                continue
            r = res["ranks"][0]
            r["ratio"] = r["peak_extra"] / r["model_bytes"]
            echo(f"  {r['model_bytes'] / MIB:,.0f} MiB model, {LABELS[what]}: +{r['peak_extra'] / MIB:,.0f} MiB "
                 f"({r['ratio']:.2f}x), {r['seconds']} s")
            rows.append(r)
    return rows


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares ``y = a + b x``."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else my / mx
    return my - b * mx, b


def per_rank_models(rows: list[dict]) -> dict:
    """Fits of a rank's peak total RSS against model bytes, for the pipeline and the best dense row."""
    fits = {}
    for what in ("pipeline", "dense", "dense_bv"):
        pts = [(r["model_bytes"], r["rss_peak_total"]) for r in rows if r["what"] == what and "failed" not in r]
        if len(pts) >= 2:
            fits[what] = fit_line(pts)
    return fits


def largest_model(fit: tuple[float, float], budget: float, world: int = 2) -> float:
    a, b = fit
    return (budget / world - a) / b


def headline(rows: list[dict], *, cap: int, reserve: int, steps: int, density: float, threads: int, batch: int,
             fisher_samples: int, verify: bool, verify_at: float = 0.95, echo=print) -> dict:
    fits = per_rank_models(rows)
    out = {"fits": {k: {"a": a, "b": b} for k, (a, b) in fits.items()}, "cap_bytes": cap, "reserve_bytes": reserve}
    if "pipeline" not in fits or not ({"dense", "dense_bv"} & set(fits)):
        out["note"] = "need the pipeline and a dense row at two sizes or more"
        return out
    machine = meminfo_bytes("MemTotal") - reserve
    dense_key = "dense_bv" if "dense_bv" in fits else "dense"
    out["machine_budget_bytes"] = machine
    out["dense_row"] = dense_key
    for label, budget in (("machine", machine), ("cap", cap)):
        s, d = largest_model(fits["pipeline"], budget), largest_model(fits[dense_key], budget)
        out[label] = {"sparsecomm_bytes": s, "dense_bytes": d, "ratio": s / d if d > 0 else None,
                      "dense_default_bytes": largest_model(fits["dense"], budget) if "dense" in fits else None}
        echo(f"  predicted, 2 ranks in {budget / GIB:.1f} GiB ({label}): sparsecomm {s / GIB:.2f} GiB model, "
             f"dense {d / GIB:.2f} GiB ({s / d:.2f}x)")
    if not verify:
        return out
    checks = []
    s_cap, d_cap = out["cap"]["sparsecomm_bytes"], out["cap"]["dense_bytes"]
    plan = [("pipeline", verify_at * s_cap, True), (dense_key, verify_at * s_cap, False),
            (dense_key, verify_at * d_cap, True)]
    for what, target, expect_fit in plan:
        w = width_for(target / MIB)
        spec = {"width": w, "what": what, "steps": steps, "density": density, "threads": threads, "batch": batch,
                "fisher_samples": fisher_samples, "device": "cpu", **SPEC_EXTRA}
        free = meminfo_bytes("MemAvailable")
        if free < cap + reserve:
            echo(f"  verification skipped: MemAvailable {free / GIB:.1f} GiB < cap {cap / GIB:.1f} GiB + reserve")
            checks.append({"what": what, "model_bytes": model_bytes(w), "expect_fit": expect_fit, "skipped": True})
            continue
        with Cage(cap) as cage:
            cage.reset_peak()
            t0 = time.monotonic()
            res = run_fresh(spec, world=2, cage=cage, timeout=1800)
            c = {"what": what, "model_bytes": model_bytes(w), "expect_fit": expect_fit, "fits": res["ok"],
                 "rc": res["rc"], "oom_kills": cage.oom_kills(), "cgroup_peak": cage.peak(),
                 "rank_peaks": [r["rss_peak_total"] for r in res["ranks"]], "seconds": round(time.monotonic() - t0, 1)}
        checks.append(c)
        echo(f"  2 ranks, {LABELS[what]}, {c['model_bytes'] / GIB:.2f} GiB model in a {cap / GIB:.1f} GiB cgroup: "
             f"{'fits' if c['fits'] else 'does not fit'} (expected: {'fits' if expect_fit else 'does not fit'}; "
             f"cgroup peak {(c['cgroup_peak'] or 0) / GIB:.2f} GiB, OOM kills {c['oom_kills']}, rc {c['rc']})")
    out["checks"] = checks
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes-mib", nargs="*", type=float, default=[128, 1024])
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="which rows to measure")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--density", type=float, default=0.005)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--fisher-samples", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dense-max-mib", type=float, default=float("inf"),
                   help="skip the dense rows above this size (they need ~4-5x the model)")
    p.add_argument("--concat-max-mib", type=float, default=128, help="the 'before' row up to this size only")
    p.add_argument("--headline", action="store_true", help="fit, predict and verify the 2-rank bound")
    p.add_argument("--no-verify", action="store_true", help="with --headline: predict only, no cgroup runs")
    p.add_argument("--cap-gib", type=float, default=8.0, help="memory cgroup cap for the verification runs")
    p.add_argument("--verify-at", type=float, default=0.95,
                   help="check at this fraction of each predicted bound (sparsecomm's: dense must not fit there)")
    p.add_argument("--reserve-gib", type=float, default=1.0, help="left to the OS when predicting for the machine")
    p.add_argument("--glibc-default", action="store_true",
                   help="leave glibc's dynamic mmap threshold on (freed 128 KiB-32 MiB blocks may stay resident)")
    p.add_argument("--merge", action="store_true", help="keep rows of other sizes from the existing memory.json")
    p.add_argument("--render-only", action="store_true")
    p.add_argument("--out", default=report.RESULTS)
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    SPEC_EXTRA["glibc_default"] = bool(a.glibc_default)
    path = os.path.join(a.out, "memory.json")
    if a.render_only:
        with open(path) as f:
            result = json.load(f)
    else:
        rows = measure_sizes(a.sizes_mib, steps=a.steps, density=a.density, dense_max_mib=a.dense_max_mib,
                             concat_max_mib=a.concat_max_mib, threads=a.threads, batch=a.batch,
                             fisher_samples=a.fisher_samples, device=a.device, rows_wanted=a.rows)
        previous = {}
        if a.merge and os.path.exists(path):
            with open(path) as f:
                previous = json.load(f)
            have = {(r["model_bytes"], r["what"]) for r in rows}
            rows = sorted([r for r in previous["rows"] if (r["model_bytes"], r["what"]) not in have] + rows,
                          key=lambda r: (r["model_bytes"], RECORDED.index(r["what"])))
        command = report.command_line(__file__, argv)
        if previous.get("command"):
            command = previous["command"] + "` then `" + command
        result = {"command": command, "environment": report.environment(), "rows": rows,
                  "steps": a.steps, "density": a.density}
        if not a.headline and "headline" in previous:
            result["headline"] = previous["headline"]
        if a.headline:
            result["headline"] = headline(rows, cap=int(a.cap_gib * GIB), reserve=int(a.reserve_gib * GIB),
                                          steps=a.steps, density=a.density, threads=a.threads, batch=a.batch,
                                          fisher_samples=a.fisher_samples, verify=not a.no_verify,
                                          verify_at=a.verify_at)
    text = render(result, a.out)
    report.publish(a.out, "memory", "Memory", result, text)
    print(text)
    report.print_verdicts(result["verdicts"])
    return result


if __name__ == "__main__":
    main()

