"""Fisher scoring speed: per-example gradients with torch.func (vmap over grad) against the
reference batch-size-1 autograd loop, on the same model and the same samples (issue 2).

    python benchmarks/fisher_speed.py [--models small_cnn resnet18 mlp] [--samples N] [--quick]

Both paths are ``sparsecomm.fisher.fisher_scores`` (``vectorized=True`` / ``False``); the scores
must agree (max relative difference printed). Target: the vmap path at least 10x faster.
Writes ``fisher_speed.{md,json}`` to ``--out``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402
import workloads  # noqa: E402

TARGET = 10.0
SAMPLES = {"small_cnn": 256, "resnet18": 64, "mlp": 64}  # per model, unless --samples; the loop is slow


def batches(wl: workloads.Workload, samples: int, batch: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    out, left = [], samples
    while left > 0:
        b = min(batch, left)
        out.append(wl.batch(b, gen))
        left -= b
    return out


def measure(model_name: str, samples: int, repeats: int, chunk_size: int) -> dict:
    from sparsecomm.fisher import fisher_scores

    wl = workloads.get(model_name)
    torch.manual_seed(0)
    model = wl.build()
    data = batches(wl, samples, 64)
    ce = nn.CrossEntropyLoss()

    def loss_fn(outputs, targets):
        return ce(workloads.logits_of(outputs), targets)

    def run(vectorized: bool):
        t = time.perf_counter()
        scores, seen = fisher_scores(model, data, loss_fn, num_samples=samples, vectorized=vectorized,
                                     chunk_size=chunk_size)
        return time.perf_counter() - t, scores, seen

    run(True)  # warm-up (vmap tracing, allocator)
    vm = [run(True) for _ in range(repeats)]
    lp = run(False)
    t_vmap = statistics.median(t for t, _, _ in vm)
    t_loop = lp[0]
    a, b = vm[0][1], lp[1]
    num = max(float((a[n] - b[n]).abs().max()) for n in a)
    den = max(float(b[n].abs().max()) for n in b)
    return {"model": model_name, "params": sum(p.numel() for p in model.parameters()), "samples": vm[0][2],
            "chunk_size": chunk_size, "vmap_s": t_vmap, "loop_s": t_loop, "speedup": t_loop / t_vmap,
            "max_rel_diff": num / den if den else 0.0, "threads": torch.get_num_threads()}


COLUMNS: list[report.Column] = [
    ("model", lambda r: r["model"]), ("params", lambda r: f"{r['params']:,}"), ("samples", lambda r: r["samples"]),
    ("vmap s", lambda r: report.fmt(r["vmap_s"])), ("loop s", lambda r: report.fmt(r["loop_s"])),
    ("threads", lambda r: r["threads"]), ("speedup", lambda r: f"{r['speedup']:.2f}x"),
    ("max rel. diff of scores", lambda r: f"{r['max_rel_diff']:.1e}"),
]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["small_cnn", "resnet18", "mlp"])
    p.add_argument("--samples", type=int, help=f"examples scored (default per model: {SAMPLES}, else 128)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: as one rank of 2 on 2 cores)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk-size", type=int, default=32)
    p.add_argument("--quick", action="store_true", help="small_cnn only, 128 samples")
    p.add_argument("--out", default=report.RESULTS)
    a = p.parse_args(argv)
    if a.quick:
        a.models, a.samples = ["small_cnn"], 128
    torch.set_num_threads(a.threads)
    rows = []
    for m in a.models:
        samples = a.samples or SAMPLES.get(m, 128)
        print(f"{m}: scoring {samples} samples both ways ...", flush=True)
        rows.append(measure(m, samples, a.repeats, a.chunk_size))
        r = rows[-1]
        print(f"  vmap {r['vmap_s']:.2f} s, loop {r['loop_s']:.2f} s: {r['speedup']:.1f}x, "
              f"scores differ by {r['max_rel_diff']:.1e} (relative)", flush=True)
    verdicts = [report.verdict(f"Fisher vmap >= {TARGET:g}x faster than the batch-size-1 loop ({r['model']})",
                               r["speedup"] >= TARGET and r["max_rel_diff"] < 1e-3,
                               f"{r['speedup']:.1f}x" + ("" if r["speedup"] >= TARGET else
                                                         f", short by {(1 - r['speedup'] / TARGET) * 100:.0f}%")
                               + ("" if r["max_rel_diff"] < 1e-3 else f"; scores DISAGREE ({r['max_rel_diff']:.1e})"))
                for r in rows]
    result = {"command": report.command_line(__file__, argv), "environment": report.environment(), "rows": rows,
              "verdicts": verdicts}
    text = (f"Command: `{result['command']}` ({result['environment']['date']}; vmap: median of {a.repeats} after a "
            f"warm-up, chunk {a.chunk_size}; loop: one run)\n\n"
            + report.md_table(rows, COLUMNS) + "\n\n" + report.verdicts_md(verdicts))
    report.write_json(os.path.join(a.out, "fisher_speed.json"), result)
    report.write_text(os.path.join(a.out, "fisher_speed.md"), "# Fisher scoring speed\n\n" + text)
    if report.is_default_out(a.out):
        report.update_readme("fisher_speed", text)
    print()
    report.print_verdicts(verdicts)
    return result


if __name__ == "__main__":
    main()
