"""logging=wandb, for real: a tiny 2-rank app run in wandb's offline mode writes ONE run (rank 0's),
whose transaction log (the ``run-<id>.wandb`` file, read here record by record with wandb's own
protobuf schema) holds the run's config, every number of ``metrics.jsonl`` at its step, the
summary record as the run's summary, and a clean exit."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from apptest import TINY, read_events, run_app

pytest.importorskip("wandb")

from wandb.proto import wandb_internal_pb2  # noqa: E402

pytestmark = pytest.mark.slow  # a 2-rank app run logged offline: about 60 s

BLOCK = 32 * 1024  # the log's block size: a record's 7-byte header never straddles a block


def wandb_records(path: Path) -> list:
    """The records of a ``.wandb`` file: a 7-byte header (``:W&B``, magic, version), then LevelDB
    log-format chunks (crc32 4, length 2, type 1: FULL 1, FIRST 2, MIDDLE 3, LAST 4) in 32 KiB blocks."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, records, partial = 7, [], b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # the block's zero-filled tail
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        partial += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(partial))
            partial = b""
    assert pos == len(data) and not partial, f"{path} ends inside a record"
    return records


def items(entries) -> dict:
    return {e.key or "/".join(e.nested_key): json.loads(e.value_json) for e in entries}


def test_offline_run_holds_the_metrics_and_summary_of_rank_0_only(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = [*TINY, "cluster.nproc_per_node=2", "eval_every=2", "logging=wandb", f"out_dir={tmp_path}", "run_id=wb"]
    proc = run_app(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = sorted(tmp_path.rglob("run-*.wandb"))
    assert [p.parent.parent for p in logs] == [tmp_path / "wb" / "wandb"], logs  # one run, in the run folder
    records = wandb_records(logs[0])
    kinds = [r.WhichOneof("record_type") for r in records]

    run = records[kinds.index("run")].run
    assert run.project == "sparsecomm" and run.display_name == "wb"
    assert items(run.config.update)["steps"] == 4

    history: dict[int, dict] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = items(r.history.item)
            history.setdefault(row["_step"], {}).update(row)
    events = read_events(tmp_path / "wb")
    logged = [e for e in events if e["event"] != "summary"]
    assert {e["event"] for e in logged} >= {"mask", "train", "eval"}
    for e in logged:
        for field, value in e.items():
            if isinstance(value, (int, float)) and field not in ("step", "time"):
                assert history[e["step"]][f"{e['event']}/{field}"] == value, (e["event"], field)

    summary: dict = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update(items(r.summary.update))
    (final,) = [e for e in events if e["event"] == "summary"]
    for field in ("task", "mask", "mask_digest", "world_size", "k", "test_acc", "bytes_sent", "dense_bytes"):
        assert summary[field] == final[field], field
    assert final["world_size"] == 2
    assert records[kinds.index("exit")].exit.exit_code == 0
