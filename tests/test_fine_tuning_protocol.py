"""benchmarks/fine_tuning_protocol.py on the synthetic task: the sweep picks each method's lr by its
runs' accuracies, seeds and the 2% density run at that lr, bytes as the app counts them, a second
invocation reuses every finished run (an interrupted protocol resumes), and the timed runs inside
an emulated link give the time and bytes to 95% of dense."""
from __future__ import annotations

import json

import pytest

from benchmarks import fine_tuning_protocol as ftp
from cluster import netem

# the synthetic task: 16 inputs -> 32 hidden -> 10 classes (task.depth=1), counted by hand
N = 16 * 32 + 32 + 32 * 10 + 10
STEPS = 6
BUDGET = ["task=synthetic", "task.in_features=16", "task.hidden=32", "task.depth=1", "task.num_train=128",
          "task.num_test=64", f"steps={STEPS}", "schedule=fish_fixed", "batch_size=8", "eval_every=0",
          "logging.progress=false", "save_model=false", "save_diff=false", "cluster.nproc_per_node=1",
          "mask.always=[]"]  # no head kept whole: k = round(density x n)


def test_time_to_an_accuracy_leaves_evaluations_out_of_the_clock():
    records = [{"event": "mask", "step": 0, "time": 1.0},
               {"event": "train", "step": 25, "time": 10.0, "bytes_sent": 100},
               {"event": "eval", "step": 25, "time": 12.0, "seconds": 2.0, "test_acc": 0.5},
               {"event": "train", "step": 50, "time": 22.0, "bytes_sent": 200},
               {"event": "eval", "step": 50, "time": 25.0, "seconds": 3.0, "test_acc": 0.9},
               {"event": "eval", "step": 50, "time": 27.0, "seconds": 2.0, "test_acc": 0.9}]
    assert ftp.time_to(records, 0.5, mask_bytes=7) == (12.0 - 2.0, 100 + 7)
    assert ftp.time_to(records, 0.8, mask_bytes=7) == (25.0 - 2.0 - 3.0, 200 + 7)
    assert ftp.time_to(records, 0.95) is None


def test_run_names_read_back():
    for args in [("wordnet", "fisher_scaled", 0.003, 2, 0.005, None), ("verb_examples", "dense", 1e-4, 0, 0.02, "1gbit")]:
        m = ftp.NAME.fullmatch(ftp.run_name(*args))
        assert (m["task"], m["method"], float(m["lr"]), int(m["seed"]), float(m["density"]), m["rate"]) == args


def test_a_method_whose_runs_all_fail_is_named_and_nothing_is_published(tmp_path, capsys):
    runs, out = tmp_path / "runs", tmp_path / "out"
    argv = ["--tasks", "synthetic", "--methods", "nosuchkind", "--lrs", "0.1", "--seeds", "1", "--runs", str(runs),
            "--out", str(out), "--budget", *BUDGET]
    assert ftp.main(argv) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [f"synthetic nosuchkind: every sweep run failed (logs in {runs})",
                   f"error: no method finished a run (logs in {runs})"]
    assert "mask=nosuchkind" in (runs / "synthetic-nosuchkind-lr0.1-s0-d0.005.log").read_text()
    assert not out.exists()


@pytest.mark.slow  # 10 one-rank app runs
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


NO_NETNS = netem.why_no_namespace()


@pytest.mark.box  # network namespaces (root)
@pytest.mark.skipif(NO_NETNS is not None, reason=f"no network namespace here: {NO_NETNS}")
def test_timed_runs_inside_the_link_reach_dense_and_count_their_bytes(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "out"
    budget = [b for b in BUDGET if b != "cluster.nproc_per_node=1"] + ["cluster.nproc_per_node=2", "steps=8"]
    argv = ["--tasks", "synthetic", "--methods", "dense", "random", "--lrs", "0.1", "--seeds", "1", "--no-density",
            "--rate", "1gbit", "--eval-every", "2", "--runs", str(runs), "--out", str(out), "--budget", *budget]
    assert ftp.main(argv) == 0
    result = json.loads((out / "fine_tuning_protocol.json").read_text())
    assert [r["seeds"] for r in result["rows"]] == [[0], [0]]  # the timed runs are not accuracy runs' seeds
    timed = {t["method"]: t for t in result["timed"]}
    assert set(timed) == {"dense", "random"}
    for method, t in timed.items():
        run = runs / f"synthetic-{method}-lr0.1-s0-d0.005-at1gbit"
        evals = [json.loads(line) for line in (run / "metrics.jsonl").open() if '"eval"' in line]
        assert [e["step"] for e in evals] == [2, 4, 6, 8] and all(e["seconds"] > 0 for e in evals)
        assert t["rate"] == "1gbit" and t["test_acc"] == json.loads((run / "summary.json").read_text())["test_acc"]
        reached = [e for e in evals if e["test_acc"] >= 0.95 * timed["dense"]["test_acc"]]  # dense: 1 seed
        if not reached:
            assert t["seconds_to"] is None
            continue
        step = reached[0]["step"]  # what was sent by then: n (dense) or k fp32 values a step, 2 ranks alike
        per_step = N if method == "dense" else json.loads((run / "summary.json").read_text())["k"]
        assert t["mb_to"] * 1e6 == step * per_step * 4
        assert 0 < t["seconds_to"] < reached[0]["time"]
    assert timed["dense"]["seconds_to"] is not None  # dense reaches 95% of itself
