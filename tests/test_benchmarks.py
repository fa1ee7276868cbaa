"""The benchmark harness (benchmarks/): a small, fast run of every variant and the link set-up.

Timings are never asserted (they are printed by the benchmarks as HOLDS / MISSED); these tests
check that every variant runs, that the table and JSON are written with sane numbers, and that
the network namespace is created, shaped and removed (also on failure) where root and iproute2
are available.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest


from benchmarks import comm, comm_results, drive, report
from cluster import netem

NO_NETNS = netem.why_no_namespace()
needs_netns = pytest.mark.skipif(NO_NETNS is not None, reason=f"no network namespace here: {NO_NETNS}")


TINY_PARAMS = 32 * 64 + 64 + 64 * 10 + 10  # the tiny workload, Linear(32, 64) and Linear(64, 10), counted by hand
VARIANTS = ["floor", "dense", "fp16", "powersgd-r1", "sc-0.5%-fp32", "sc-0.5%-bf16", "sc-0.5%-fp32-perbucket"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """comm.py on the tiny model: 2 ranks, unshaped, 3 timed steps, one variant of each kind, each
    one run of the app."""
    out = tmp_path_factory.mktemp("comm")
    result = comm.main(["--models", "tiny", "--rates", "unshaped", "--ranks", "2", "--steps", "3", "--warmup", "1",
                        "--variants", *VARIANTS, "--out", str(out)])
    return out, result


@pytest.mark.slow
def test_every_variant_runs_and_numbers_are_sane(tiny_run):
    out, result = tiny_run
    assert result["failures"] == {}
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == set(VARIANTS) <= {v["id"] for v in comm_results.variant_list()}
    params = TINY_PARAMS
    for vid, r in rows.items():
        assert r["params"] == params, vid
        assert r["world_size"] == 2 and r["steps"] == 3 and len(r["step_s_all"]) == 3, vid
        assert 0 < r["step_s"] < 30 and math.isfinite(r["step_s"]), vid
        assert r["losses_finite"], vid
        assert r["peak_rss_bytes"] is None or r["peak_rss_bytes"] > 10 * 2**20, vid
        assert any(o.startswith("comm=") for o in r["overrides"]), vid  # the app's own comm option
        if vid != "floor":
            assert r["wire_bytes_per_rank"] > 0, vid  # something crossed the loopback
    assert rows["floor"]["payload_bytes"] == 0 and rows["floor"]["opt_state_bytes"] == 0
    assert rows["dense"]["payload_bytes"] == 4 * params  # n fp32 gradient entries a step
    assert rows["fp16"]["payload_bytes"] == 2 * params  # the same in fp16
    assert rows["dense"]["opt_state_bytes"] >= 2 * 4 * params  # two fp32 moments per entry
    for vid, r in rows.items():
        if r["kind"] == "sparsecomm":
            per = 2 if r["wire"] == "bf16" else 4
            assert r["k"] == round(r["density"] * params), vid
            assert r["payload_bytes"] == per * r["k"] == r["lib_bytes_sent"], vid  # the app's counter == ours
            assert 0 < r["opt_state_bytes"] < rows["dense"]["opt_state_bytes"] / 10, vid
            if r.get("fused", True):
                assert r["all_reduce_calls_per_step"] == 1, vid  # one fused collective per step
    if not result["fallback"]:  # isolated namespace: the loopback carried our traffic only
        assert rows["dense"]["wire_bytes_per_rank"] >= 4 * params  # 2(N-1)/N x payload, N = 2
        assert rows["dense"]["wire_bytes_per_rank"] < 4 * params + 64 * 1024
        assert rows["floor"]["wire_bytes_per_rank"] < 1024


@pytest.mark.slow
def test_table_json_and_plots_written(tiny_run):
    out, result = tiny_run
    with open(out / "comm.json") as f:
        saved = json.load(f)
    assert len(saved["rows"]) == len(result["rows"]) and saved["command"].startswith("python -m benchmarks.comm ")
    md = (out / "comm.md").read_text().splitlines()
    header = ("| model | link | N | variant | step s | x floor | dense / this | fwd / bwd+comm / opt s | "
              "wire MB/rank/step | payload MB (ours) | wire / 2(N-1)/N payload | wire vs dense | "
              "peak RSS MiB steps / set-up | opt state MB | hook state MB | notes |")
    assert header in md and md[md.index(header) + 1] == "|" + "|".join(["---"] * 16) + "|"
    for r in saved["rows"]:  # one line per measured row, its configuration in the first four cells
        start = f"| {r['model']} | {r['link']} | {r['world_size']} | {r['variant']} | "
        (line,) = [m for m in md if m.startswith(start)]
        assert line.count(" | ") == 15 and line.endswith(" |"), line
    assert any(v in "\n".join(md) for v in ("HOLDS", "MISSED", "N/A"))
    if report.pyplot() is not None:
        for name in ("comm_step_time.png", "comm_wire_bytes.png"):
            assert (out / name).stat().st_size > 1000
    assert not (out / "tmp").exists()


def test_every_process_of_an_alone_launch_has_a_run_folder_of_its_own(tmp_path):
    """``"alone"`` (the compute floor): every process of the launch is rank 0 of a world of its own
    and writes a run folder; a folder shared by the launch would be removed by one process while
    another still writes it (files were left in the workers' scratch folder)."""
    spec = {"workdir": str(tmp_path)}
    alone = [drive.run_folder(spec, {"id": "floor", "alone": True}, r) for r in range(4)]
    shared = [drive.run_folder(spec, {"id": "dense"}, r) for r in range(4)]
    assert len(set(alone)) == 4 and len(set(shared)) == 1
    assert all(os.path.dirname(p) == str(tmp_path) for p in alone + shared)


@pytest.mark.slow
def test_merge_keeps_other_configurations_and_render_only(tiny_run, tmp_path):
    """--merge: rows of (model, link, ranks) not re-measured are kept, re-measured ones replaced;
    --render-only rebuilds the table from comm.json alone."""
    out, result = tiny_run
    with open(out / "comm.json") as f:
        saved = json.load(f)
    other = [dict(r, model="othermodel", run={"command": "python -m benchmarks.comm --models othermodel",
                                              "date": "2026-01-01T00:00:00"}) for r in saved["rows"]]
    prev = dict(saved, rows=other + saved["rows"])
    (tmp_path / "comm.json").write_text(json.dumps(prev))
    fresh = [dict(r, step_s=r["step_s"] * 2) for r in saved["rows"]]  # "re-measured" tiny rows
    rows, failures = comm_results.merge_previous(str(tmp_path / "comm.json"), fresh, {})
    assert len(rows) == 2 * len(saved["rows"]) and failures == {}
    assert [r["model"] for r in rows].count("othermodel") == len(other)
    tiny = [r for r in rows if r["model"] == "tiny"]
    assert [r["step_s"] for r in tiny] == [r["step_s"] for r in fresh]  # replaced, not duplicated
    assert comm_results.merge_previous(str(tmp_path / "missing.json"), fresh, {})[0] == fresh
    prev["rows"] = rows
    (tmp_path / "comm.json").write_text(json.dumps(prev))
    res = comm.main(["--render-only", "--out", str(tmp_path)])
    md = (tmp_path / "comm.md").read_text()
    assert "Rows merged from several runs" in md and "othermodel/unshaped/N2" in md
    assert md.count("| othermodel |") == len(other) and len(res["rows"]) == len(rows)


@pytest.mark.slow
def test_time_to_accuracy_smoke(tmp_path):
    from benchmarks import time_to_accuracy

    res = time_to_accuracy.main(["--methods", "fish", "--steps", "6", "--dense-steps", "2",
                                 "--eval-every", "3", "--seeds", "1", "--rate", "unshaped", "--num-samples", "32",
                                 "--out", str(tmp_path)])["digits"]
    assert res["exit_code"] == 0, res["error_tail"]
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == {"fish"}
    test_size = 360  # the digits task's test split (sparsecomm/app/tasks/digits.py)
    (run,) = res["runs"]
    assert "mask=fisher" in run["overrides"] and "comm=masked" in run["overrides"]
    assert [p["step"] for p in run["curve"]] == [3, 6]
    for p in run["curve"]:  # a count of correct answers over the test set
        assert abs(p["accuracy"] * test_size - round(p["accuracy"] * test_size)) < 1e-9, p
    secs = [p["seconds"] for p in run["curve"]]
    assert secs == sorted(secs) and secs[-1] > 0
    from sparsecomm.app import models

    n = sum(p.numel() for p in models.small_cnn(10).parameters())  # the digits task's model
    k = round(0.005 * n)
    assert run["k"] == k  # the head, kept whole, counts toward the density
    # 2 dense steps (every fp32 gradient entry), then 4 masked ones (k entries); the Fisher scores'
    # exchange is counted apart (mask_score_bytes)
    assert run["curve"][-1]["payload_bytes"] == 2 * 4 * n + 4 * 4 * run["k"]
    assert (tmp_path / "tta_digits.md").exists() and (tmp_path / "tta_digits.json").exists()


def test_small_benchmarks_run(tmp_path):
    from benchmarks import fisher_speed, optimizer_state, overhead, workloads

    r = fisher_speed.measure("tiny", samples=16, repeats=1, chunk_size=8)
    assert r["engine"] == "layers" and r["max_rel_diff"] < 1e-4 and r["vec_s"] > 0 and r["loop_s"] > 0
    assert r["vmap_s"] > 0 and r["vmap_max_rel_diff"] < 1e-4 and r["fwd_bwd_s"] > 0
    rows = optimizer_state.measure("tiny", [0.1])
    assert rows[0]["masked_bytes"] == rows[0]["independent_bytes"]
    assert 0.9 < rows[0]["ratio_over_density"] < 1.1
    tiny = workloads.get("tiny")
    o = overhead.measure("tiny", tiny.build, tiny.batch, k=50, reps=2)
    assert o["k"] == 50 and o["pack_s"] > 0 and o["fwd_bwd_s"] > 0


def test_rates_and_report_helpers(tmp_path):
    assert netem.parse_rate("1gbit") == 1e9 and netem.parse_rate("100mbit") == 1e8
    assert netem.parse_rate("unshaped") is None
    with pytest.raises(ValueError, match="not a tc rate"):
        netem.parse_rate("fast")
    assert netem.tbf_burst_bytes(1e9) == 256 * 1024 and netem.tbf_burst_bytes(1e10) > 2e6
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- BEGIN comm -->\nold\n<!-- END comm -->\ntail\n")
    assert report.update_readme("comm", "new table", str(readme))
    assert readme.read_text() == "intro\n<!-- BEGIN comm -->\nnew table\n<!-- END comm -->\ntail\n"
    assert not report.update_readme("other", "x", str(readme))
    # a block is written for results/<name>.md: in benchmarks/README.md its plots live under results/
    assert report.update_readme("comm", "![plot](comm.png) [raw](results/comm.json) [web](https://x.org/a.png)", str(readme))
    assert "![plot](results/comm.png) [raw](results/comm.json) [web](https://x.org/a.png)" in readme.read_text()


def test_fallback_without_namespace():
    with netem.Link("1gbit", isolate=False) as link:
        assert not link.isolated and link.fallback and link.rate == "unshaped"
        assert link.wrap(["true"]) == ["true"]
        assert isinstance(link.tx_bytes(), int)


@needs_netns
def test_namespace_shaped_and_removed():
    with netem.Link("100mbit") as link:
        name = link.name
        assert name in netem.list_namespaces()
        assert "tbf" in link.qdisc() and "100Mbit" in link.qdisc()
        before = link.tx_bytes()
        subprocess.run(link.wrap([sys.executable, "-c",
                                  "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                                  "s.sendto(b'x'*1000, ('127.0.0.1', 9))"]), check=True, timeout=30)
        assert link.tx_bytes() - before >= 1000  # our datagram, counted inside the namespace
    assert name not in netem.list_namespaces()


@needs_netns
def test_namespace_removed_on_failure_with_processes_inside():
    with pytest.raises(RuntimeError, match="boom"):
        with netem.Link("unshaped") as link:
            name = link.name
            sleeper = subprocess.Popen(link.wrap(["sleep", "60"]))
            deadline = time.monotonic() + 30
            while sleeper.pid not in netem.namespace_pids(name):  # inside (ip netns exec has reached sleep)
                assert sleeper.poll() is None and time.monotonic() < deadline, "the sleeper never entered"
                time.sleep(0.05)
            raise RuntimeError("boom")
    assert name not in netem.list_namespaces()
    assert sleeper.wait(timeout=10) != 0  # killed by the teardown


@needs_netns
def test_stale_namespace_of_a_dead_run_is_removed():
    dead = subprocess.Popen(["true"])
    dead.wait()
    name = f"{netem.PREFIX}{dead.pid}-0"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        time.sleep(0.1)
        assert name in netem.remove_stale()
        assert name not in netem.list_namespaces()
    finally:
        netem.delete_namespace(name)
