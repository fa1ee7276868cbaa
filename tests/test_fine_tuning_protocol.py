"""benchmarks/fine_tuning_protocol.py on the synthetic task: the sweep picks each method's lr by its
runs' accuracies, seeds and the 2% density run at that lr, bytes as the app counts them, and a
second invocation reuses every finished run (an interrupted protocol resumes)."""
from __future__ import annotations

import json

import pytest

from benchmarks import fine_tuning_protocol as ftp

pytestmark = pytest.mark.slow  # 10 one-rank app runs

# the synthetic task: 16 inputs -> 32 hidden -> 10 classes (task.depth=1), counted by hand
N = 16 * 32 + 32 + 32 * 10 + 10
STEPS = 6
BUDGET = ["task=synthetic", "task.in_features=16", "task.hidden=32", "task.depth=1", "task.num_train=128",
          "task.num_test=64", f"steps={STEPS}", "schedule=fish_fixed", "batch_size=8", "eval_every=0",
          "logging.progress=false", "save_model=false", "save_diff=false", "cluster.nproc_per_node=1",
          "mask.always=[]"]  # no head kept whole: k = round(density x n)


def test_sweep_seeds_density_and_resume(tmp_path, capsys):
    runs, out = tmp_path / "runs", tmp_path / "out"
    argv = ["--tasks", "synthetic", "--methods", "dense", "random", "--lrs", "0.001", "0.1", "--seeds", "2",
            "--runs", str(runs), "--out", str(out), "--budget", *BUDGET]
    assert ftp.main(argv) == 0
    started = [line for line in capsys.readouterr().out.splitlines() if ": exit 0," in line]
    # per method 2 sweep runs + seed 1; random also at 2%
    assert len(started) == 2 * 3 + 1, started
    summaries = {p.parent.name: json.loads(p.read_text()) for p in runs.glob("*/summary.json")}
    assert len(summaries) == 7
    result = json.loads((out / "fine_tuning_protocol.json").read_text())
    rows = {(r["method"], r["density"]): r for r in result["rows"]}
    assert set(rows) == {("dense", None), ("random", 0.005), ("random", 0.02)}
    for method in ("dense", "random"):
        sweep = {lr: summaries[f"synthetic-{method}-lr{lr:g}-s0-d0.005"]["test_acc"] for lr in (0.001, 0.1)}
        best = max(sweep, key=lambda lr: (sweep[lr], -lr))
        row = rows[(method, None if method == "dense" else 0.005)]
        assert row["lr"] == best and row["seeds"] == [0, 1]
        assert row["accs"] == [summaries[f"synthetic-{method}-lr{best:g}-s{s}-d0.005"]["test_acc"] for s in (0, 1)]
    # bytes per step: n fp32 entries dense, k = round(d n) masked
    assert rows[("dense", None)]["wire_mb"] * 1e6 == STEPS * 4 * N and rows[("dense", None)]["of_dense"] == 1
    for d in (0.005, 0.02):
        k = summaries[f"synthetic-random-lr{rows[('random', d)]['lr']:g}-s0-d{d:g}"]["k"]
        assert k == round(d * N) and rows[("random", d)]["wire_mb"] * 1e6 == STEPS * 4 * k
    assert (out / "fine_tuning_protocol.md").read_text().count("| synthetic |") == 3 + 2  # rows + sweep lines
    assert (out / "fine_tuning_protocol.png").stat().st_size > 0

    assert ftp.main(argv) == 0  # everything is there: nothing runs again
    assert ": exit " not in capsys.readouterr().out
