"""Optimizer state bytes: ``MaskedAdamW.state_bytes()`` against ``torch.optim.AdamW`` (issue 2).

    python -m benchmarks.optimizer_state [--model mlp] [--densities 0.001 0.005 0.02]

After one step on the same model and gradients, the state tensors of torch's AdamW (two moments
of n entries, plus a 4-byte step counter per parameter) are compared with MaskedAdamW's (two
moments of k entries). Expected ratio: about the density. Writes ``optimizer_state.{md,json}``.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

import sparsecomm
from benchmarks import report, workloads
from sparsecomm.app.engine import StepEngine


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if isinstance(v, torch.Tensor))


def measure(model_name: str, densities) -> list[dict]:
    wl = workloads.get(model_name)
    torch.manual_seed(0)
    model = wl.build()
    batch = wl.batch(4, torch.Generator().manual_seed(0))
    ce = nn.CrossEntropyLoss()
    engine = StepEngine(lambda out, y: ce(workloads.logits_of(out), y))  # the app's step fills the state
    n = sum(p.numel() for p in model.parameters())
    dense = torch.optim.AdamW(model.parameters(), lr=0.0)  # lr 0: the weights stay as they are
    engine.step(model, batch, dense)
    dense_bytes = state_bytes(dense)
    del dense
    rows = []
    for d in densities:
        mask = sparsecomm.random_mask(model, density=d, seed=0)
        opt = sparsecomm.MaskedAdamW(model, mask, lr=0.0, weight_decay=0.0)
        engine.step(model, batch, opt)
        mine = opt.state_bytes()
        rows.append({"model": model_name, "params": n, "density": d, "k": mask.num_selected,
                     "adamw_bytes": dense_bytes, "masked_bytes": mine, "independent_bytes": state_bytes(opt),
                     "ratio": mine / dense_bytes, "ratio_over_density": mine / dense_bytes / mask.density})
    return rows


COLUMNS: list[report.Column] = [
    ("model", lambda r: r["model"]), ("params", lambda r: f"{r['params']:,}"),
    ("density", lambda r: f"{r['density'] * 100:g}%"), ("k", lambda r: f"{r['k']:,}"),
    ("AdamW state MB", lambda r: report.mb(r["adamw_bytes"])),
    ("MaskedAdamW state MB", lambda r: report.mb(r["masked_bytes"])),
    ("ratio", lambda r: f"{r['ratio']:.5f}"), ("ratio / density", lambda r: f"{r['ratio_over_density']:.3f}"),
]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mlp")
    p.add_argument("--densities", nargs="+", type=float, default=[0.001, 0.005, 0.02])
    p.add_argument("--out", default=report.RESULTS)
    a = p.parse_args(argv)
    rows = measure(a.model, a.densities)
    verdicts = [report.verdict(f"MaskedAdamW state about density x AdamW's ({r['density'] * 100:g}%)",
                               0.9 <= r["ratio_over_density"] <= 1.1 and r["masked_bytes"] == r["independent_bytes"],
                               f"{r['ratio']:.5f} = {r['ratio_over_density']:.3f} x density"
                               + ("" if r["masked_bytes"] == r["independent_bytes"]
                                  else f"; state_bytes() says {r['masked_bytes']}, the state holds "
                                       f"{r['independent_bytes']}"))
                for r in rows]
    result = report.publish_measurements(a.out, "optimizer_state", "Optimizer state", __file__, argv, rows, COLUMNS,
                                         verdicts)
    print(report.md_table(rows, COLUMNS))
    report.print_verdicts(verdicts)
    return result


if __name__ == "__main__":
    main()
