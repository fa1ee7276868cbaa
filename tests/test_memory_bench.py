"""benchmarks/memory.py runs end to end on tiny models and writes sane numbers (its training rows
are the app's own runs).

Memory figures are never asserted here (they are the benchmark's verdicts): only that every row
runs in its own process, reports a peak at or above zero and a model size that matches the
width, and that the tables, fits and JSON come out.
"""
from __future__ import annotations

import json

import pytest


from benchmarks import memory


def test_width_and_fit_helpers():
    for mib in (128, 1024, 4096):
        w = memory.width_for(mib)
        assert w % 16 == 0 and abs(8 * (w * w + w) * 4 / 2**20 - mib) / mib < 0.02
        assert memory.model_bytes(w) == 8 * (w * w + w) * 4
    a, b = memory.fit_line([(1.0, 5.0), (2.0, 7.0), (4.0, 11.0)])
    assert abs(a - 3.0) < 1e-9 and abs(b - 2.0) < 1e-9
    assert memory.largest_model((3.0, 2.0), budget=26.0, world=2) == 5.0


@pytest.mark.slow
def test_rows_run_in_fresh_processes_and_publish(tmp_path):
    result = memory.main(["--sizes-mib", "1", "--steps", "1", "--fisher-samples", "32",
                          "--rows", "random_mask", "pipeline", "--out", str(tmp_path)])
    rows = result["rows"]
    assert [r["what"] for r in rows] == ["random_mask", "pipeline"]
    for r in rows:
        assert "failed" not in r, r
        assert r["peak_extra"] >= 0 and r["rss_peak_total"] >= r["rss_before"], r
        w = r["width"]  # 8 fp32 nn.Linear(w, w) layers, weights and biases, counted by hand
        assert r["model_bytes"] == 8 * (w * w + w) * 4 and r["k"] == round(0.005 * 8 * (w * w + w))
    pipe = rows[1]
    assert pipe["steps"] == 1 and pipe["loss_finite"] and set(pipe["phases"]) == {"setup", "first_step", "train"}
    assert "comm=masked" in pipe["overrides"] and "mask=fisher" in pipe["overrides"]  # the app's own run
    with open(tmp_path / "memory.json") as f:
        saved = json.load(f)["rows"]
    assert [r["what"] for r in saved] == ["random_mask", "pipeline"]  # the file, checked as the rows were
    for r in saved:
        w = r["width"]
        assert r["model_bytes"] == 8 * (w * w + w) * 4 and r["k"] == round(0.005 * 8 * (w * w + w)), r
    assert saved[1]["steps"] == 1 and saved[1]["loss_finite"] is True and "first_step" in saved[1]["phases"]
    assert "| fp32 model |" in (tmp_path / "memory.md").read_text()


def test_headline_prediction_from_fitted_rows():
    """Per-rank peak = a + b x model: the largest model for 2 ranks is (budget / 2 - a) / b."""
    rows = [{"what": w, "model_bytes": m, "rss_peak_total": a + b * m}
            for w, a, b in (("pipeline", 300e6, 2.3), ("dense_bv", 300e6, 4.3), ("dense", 300e6, 5.3))
            for m in (128e6, 1e9)]
    head = memory.headline(rows, cap=8 * memory.GIB, reserve=memory.GIB, steps=1, density=0.005, threads=1,
                           batch=2, fisher_samples=32, verify=False, echo=lambda *_: None)
    assert head["dense_row"] == "dense_bv"
    cap = head["cap"]
    assert abs(cap["sparsecomm_bytes"] - (4 * memory.GIB - 300e6) / 2.3) < 1e3
    assert abs(cap["ratio"] - 4.3 / 2.3) < 1e-9
