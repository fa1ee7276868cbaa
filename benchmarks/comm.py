"""Communication benchmark: step time and bytes on the wire of sparsecomm against dense DDP, the
fp16 hook and PowerSGD, on an emulated cluster link (issue 4).

    python -m benchmarks.comm                # 25M MLP: 4 links x 2 ranks, + 4 ranks at 1 Gbit (~15 min)
    python -m benchmarks.comm --quick        # 25M MLP, 2 ranks, 1 Gbit + unshaped (~5 min)
    python -m benchmarks.comm --full         # 3 models x 4 links x 2 and 4 ranks (hours on 2 cores)
    python -m benchmarks.comm --rates 1gbit --ranks 2 4 --models mlp resnet18   # any cross product
    python -m benchmarks.comm --nodes 2 --procs-per-node 2 --link 1gbit   # emulated nodes: comm_multinode

For each link rate, a private network namespace is created with its loopback shaped by
``tc tbf`` (see :mod:`cluster.netem`); for each rank count and model, torchrun starts the ranks inside it
and every variant runs in the same processes, on the same model, batch, seed and link:

    floor         forward+backward alone: no DDP, no optimizer
    dense         DDP + torch.optim.AdamW (what users have today)
    fp16          DDP fp16_compress_hook + AdamW
    powersgd-r1/4 PowerSGD rank 1 / 4 (one bucket, start_powerSGD_iter=2, eps 1e-8) + AdamW
    sc-D%-fp32/bf16   sparsecomm at density D (random mask; step time does not depend on which
                  entries) with an fp32 / bf16 wire + MaskedAdamW; sc-0.5%-fp32-perbucket: one
                  all-reduce per bucket instead of the default single fused one

Writes ``comm.md``, ``comm.json``, ``comm_step_time.png`` and ``comm_wire_bytes.png`` to
``--out`` (default ``benchmarks/results/``), prints every target as HOLDS / MISSED with the
measured ratio, and (for the default ``--out``) refreshes the table in ``benchmarks/README.md``.
"""
from __future__ import annotations

import argparse
import os
import time

from benchmarks import comm_multinode, harness, report, workloads
from benchmarks.comm_results import (COLUMNS, DEFAULT_DENSITIES, annotate, conclude, payload, plots, rebuild, render,
                                     targets, variant_list, worker_spec)
from cluster import netem

# (link rate, ranks, model) run by a bare `python -m benchmarks.comm`: ~15 min on 2 cores.
DEFAULT_MATRIX = [("100mbit", 2, "mlp"), ("1gbit", 2, "mlp"), ("1gbit", 4, "mlp"), ("10gbit", 2, "mlp"),
                  ("unshaped", 2, "mlp")]


# --- driver ----------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="25M MLP, 2 ranks, 1gbit and unshaped")
    p.add_argument("--full", action="store_true", help="3 models x 100mbit/1gbit/10gbit/unshaped x 2 and 4 ranks")
    p.add_argument("--rates", nargs="+", help="tc rates, e.g. 100mbit 1gbit 10gbit unshaped (default: all four)")
    p.add_argument("--ranks", nargs="+", type=int, help="ranks per run, e.g. 2 4 (default: 2)")
    p.add_argument("--models", nargs="+", help=f"workloads: {', '.join(workloads.WORKLOADS)} (default: mlp)")
    p.add_argument("--nodes", type=int, default=1,
                   help="emulated nodes (cluster/box.py, root): > 1 runs comm_multinode.py's matrix")
    p.add_argument("--procs-per-node", type=int, default=2, help="ranks per node with --nodes > 1")
    p.add_argument("--link", dest="rates", nargs="+", help="same as --rates")
    p.add_argument("--densities", nargs="+", type=float, default=list(DEFAULT_DENSITIES))
    p.add_argument("--variants", nargs="+", help="only these variant ids (default: all)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (>= 5 for the report)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, help="per rank (default: the workload's)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out", default=report.RESULTS, help="output directory (default benchmarks/results)")
    p.add_argument("--launch-timeout", type=float, default=1800, help="seconds per torchrun launch")
    p.add_argument("--no-namespace", action="store_true", help="run on the host loopback, unshaped (testing)")
    p.add_argument("--render-only", action="store_true",
                   help="measure nothing: rebuild comm.md, the verdicts, the plots and the README block from "
                        "--out/comm.json")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of --out/comm.json whose (model, link, ranks, variant) this run does not "
                        "measure, so runs of different models (or a re-run of some variants) add up to one table")
    a = p.parse_args(argv)
    if a.nodes > 1:
        return comm_multinode.configure(a)
    if a.full:
        defaults = (["mlp", "resnet18", "gpt2"], ["100mbit", "1gbit", "10gbit", "unshaped"], [2, 4])
    elif a.quick:
        defaults = (["mlp"], ["1gbit", "unshaped"], [2])
    else:
        defaults = None
    if defaults is None and not (a.models or a.rates or a.ranks):
        a.configs = list(DEFAULT_MATRIX)
    else:
        defaults = defaults or (["mlp"], ["100mbit", "1gbit", "10gbit", "unshaped"], [2])
        a.configs = [(rate, n, m) for rate in (a.rates or defaults[1]) for n in (a.ranks or defaults[2])
                     for m in (a.models or defaults[0])]
    for rate, n, m in a.configs:
        workloads.get(m)
        netem.parse_rate(rate)
        if n < 2:
            raise SystemExit(f"--ranks {n}: a communication benchmark needs at least 2 ranks")
    return a


def write_outputs(result: dict, out: str) -> None:
    """comm.json, comm.md, the plots and (for the default --out) the README block."""
    report.publish(out, "comm", "Communication benchmark", result, render(result))
    result["plots"] = plots(result["rows"], out)


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.nodes > 1:
        return comm_multinode.main(a, argv)
    if a.render_only:
        return rebuild(a.out, "comm", annotate, targets, write_outputs)
    t_start = time.monotonic()
    os.makedirs(a.out, exist_ok=True)
    workdir = os.path.join(a.out, "tmp")
    stale = netem.remove_stale()
    if stale:
        print(f"removed namespaces left by earlier runs: {', '.join(stale)}")
    vs = variant_list(a.densities)
    if a.variants:
        vs = [v for v in vs if v["id"] in set(a.variants)]
    rows, failures, fallback = [], {}, None
    for rate in dict.fromkeys(rate for rate, _, _ in a.configs):
        with netem.Link(rate, isolate=not a.no_namespace) as link:
            if link.fallback:
                if fallback:
                    print(f"link {rate}: skipped, no namespace (the unshaped host loopback was measured once)")
                    continue
                fallback = link.fallback
                print(f"WARNING: {link.fallback}")
            print(f"link {link.label}" + (f" ({link.qdisc()})" if link.isolated else ""))
            for _, n, model in [c for c in a.configs if c[0] == rate]:
                spec = worker_spec(a, model, vs, tx_path="/sys/class/net/lo/statistics/tx_bytes")
                print(f"  {model} on {n} ranks, batch {spec['batch_size']}/rank", flush=True)
                got, failed = harness.launch(link, n, spec, workdir=workdir, timeout=a.launch_timeout,
                                             echo=lambda s: print(s, flush=True))
                for r in got:
                    payload(r)
                rows += got
                failures.update({f"{model}/{link.label}/N{n}/{k}": v for k, v in failed.items()})
    return conclude(a, argv, t_start, rows, failures, name="comm", annotate=annotate, targets=targets,
                    write=write_outputs, columns=COLUMNS, fallback=fallback)


if __name__ == "__main__":
    main()

