"""comm.py --nodes: the ring prediction per interface and the verdicts (synthetic rows), and one
tiny run across 2 emulated nodes (root only: cluster/box.py)."""
from __future__ import annotations


import pytest


from benchmarks import comm, comm_multinode


def row(variant, kind, step_s, payload, eth0, lo, model="mlp", link="1gbit 2 nodes"):
    return {"model": model, "link": link, "world_size": 4, "nodes": 2, "variant": variant, "kind": kind,
            "step_s": step_s, "payload_bytes": payload, "wire_bytes_per_rank": (eth0 + lo) / 4,
            "node_tx_bytes_per_step": {"eth0": eth0, "lo": lo}, "link_note": "", "losses_finite": True,
            "all_reduce_calls_per_step": 1.0, "phases_s": {"forward": 0.1, "backward": 0.2, "optimizer": 0.01},
            "k": payload // 4, "wire": "fp32", "lib_bytes_sent": payload}


def test_ring_prediction_splits_inter_and_intra_node():
    # 4 ranks on 2 nodes: each rank sends 2*3/4 = 1.5 x payload; 2 of the 4 ring edges cross nodes
    rows = [row("floor", "floor", 0.10, 0, 1000, 500),
            row("dense", "dense", 2.00, 100e6, 2 * 1.5 * 100e6 * 1.02, 2 * 1.5 * 100e6),
            row("sc-0.5%-fp32", "sparsecomm", 0.12, 500e3, 2 * 1.5 * 500e3 * 1.3, 2 * 1.5 * 500e3)]
    comm_multinode.annotate(rows)
    dense, sc = rows[1], rows[2]
    assert dense["inter_expected"] == pytest.approx(3e8) and dense["intra_expected"] == pytest.approx(3e8)
    assert dense["inter_vs_ring"] == pytest.approx(1.02) and "eth0 bytes off" not in dense["notes"]
    assert sc["inter_vs_ring"] == pytest.approx(1.3) and "eth0 bytes off the ring prediction" in sc["notes"]
    verdicts = {v["target"]: v for v in comm_multinode.targets(rows)}
    floor_v = next(v for t, v in verdicts.items() if "1.3x floor" in t)
    dense_v = next(v for t, v in verdicts.items() if "10x faster" in t)
    bytes_v = next(v for t, v in verdicts.items() if "ring prediction" in t)
    assert floor_v["status"] == "HOLDS"           # 0.12 / 0.10 = 1.2x
    assert dense_v["status"] == "HOLDS"           # 2.00 / 0.12 = 16.7x
    assert bytes_v["status"] == "MISSED" and "sc-0.5%-fp32 +30.0%" in bytes_v["measured"]


@pytest.mark.box
@pytest.mark.timeout(600)
def test_tiny_run_across_two_nodes(tmp_path):
    box = comm_multinode.boxlink.box
    reason = box.why_not()
    if reason:
        pytest.skip(f"cluster in a box: {reason}")
    result = comm.main(["--nodes", "2", "--procs-per-node", "1", "--link", "1gbit", "--models", "tiny",
                        "--variants", "floor", "dense", "--steps", "3", "--warmup", "1", "--out", str(tmp_path)])
    assert not result["failures"]
    dense = next(r for r in result["rows"] if r["variant"] == "dense")
    # 2 ranks, one per node: every byte of the ring crosses eth0, nothing stays on lo
    assert dense["nodes"] == 2 and dense["inter_bytes"] > dense["payload_bytes"]
    assert dense["intra_expected"] == 0
    assert (tmp_path / "comm_multinode.md").exists() and not box.namespaces(comm_multinode.boxlink.NAME)
