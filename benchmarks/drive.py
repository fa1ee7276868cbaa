"""One run of the app on this rank, with a benchmark's meters: ``python -m benchmarks.drive SPEC.json``.

torchrun starts it on every rank (:func:`benchmarks.harness.launch`). It composes the app's config
from the variant's overrides (``sparsecomm.app.compose.compose_config``: a task, a ``comm=`` option,
a ``mask=`` kind, the run's length), hands ``sparsecomm.app.trainer.run`` the meters the spec asks
for (:mod:`benchmarks.meters`) and, on rank 0, writes the variant's row to ``spec['out']``. Nothing
here trains: the app's own run does, exactly as ``sparsecomm-train`` would with those overrides.

SPEC (JSON)::

    {"out": "rows.json", "workdir": "scratch folder", "threads": 1,
     "meter": "steps" | "curve",              # StepMeter (time, bytes per step) | AccuracyCurve
     "tx_path": "/sys/class/net/lo/statistics/tx_bytes" | "ifaces": ["eth0", "lo"],
     "variants": [{"id": "dense", "overrides": ["task=synthetic", "comm=dense", ...],
                   "warmup": 2, "steps": 5, "alone": false, ...facts copied into the row}]}

The first variant of the list runs (``trainer.run`` joins and leaves the process group, so one
run per launch; the harness launches again for the rest). ``"alone": true`` runs every process as
a world of its own (no gradient traffic: the compute floor under the same CPU sharing); rank 0 of
the launch reports its own numbers.
"""
from __future__ import annotations

import json
import os
import shutil
import sys

from benchmarks import harness
from benchmarks.meters import AccuracyCurve, Link, StepMeter
from sparsecomm.app import trainer
from sparsecomm.app.compose import compose_config

SUMMARY_FIELDS = ("numel", "k", "density", "test_acc", "train_s", "bytes_sent", "dense_bytes", "mask_score_bytes",
                  "task_diff_bytes", "full_model_bytes", "comm", "state_bytes")  # of the app's summary, into the row
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
               "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE")


def meters(spec: dict, variant: dict) -> list:
    link = Link(spec)
    if spec.get("meter", "steps") == "curve":
        return [AccuracyCurve(link)]
    return [StepMeter(int(variant["warmup"]), int(variant["steps"]), link)]


def run_folder(spec: dict, variant: dict, launch_rank: int) -> str:
    """The run folder this process's run writes (its rank 0 does), removed once the row is made: one
    per launch (the launching agent's pid), and per process for ``"alone"``, where every process is
    rank 0 of a world of its own (a shared folder would be removed under a process still writing it)."""
    name = f"run-{variant['id']}-{os.getppid()}" + (f"-{launch_rank}" if variant.get("alone") else "")
    return os.path.join(spec["workdir"], name)


def run_variant(spec: dict, variant: dict, launch_rank: int, launch_world: int) -> dict:
    """The app's run of ``variant`` on this rank; returns its row (every rank)."""
    run_dir = run_folder(spec, variant, launch_rank)
    cfg = compose_config([*variant["overrides"], f"cluster.num_threads={int(spec.get('threads', 1))}"])
    summary = trainer.run(cfg, run_dir, callbacks=meters(spec, variant))
    row = {k: v for k, v in variant.items() if k not in ("overrides", "alone")}
    row.update({k: summary.get(k) for k in SUMMARY_FIELDS}, variant=variant["id"], overrides=variant["overrides"],
               params=summary["numel"])
    row.update(summary.get("bench", {}))
    row.update(summary.get("accuracy", {}))
    if variant.get("alone"):  # every process alone: the launch's size, and the compute of a step only
        phases = row.get("phases_s", {})
        row.update(world_size=launch_world, step_s=phases.get("forward", 0.0) + phases.get("backward", 0.0))
    if launch_rank == 0 or variant.get("alone"):  # whoever wrote the folder
        shutil.rmtree(run_dir, ignore_errors=True)
    return row


def main(spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    variant = spec["variants"][0]
    launch_rank, launch_world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if variant.get("alone"):
        for name in LAUNCH_VARS:
            os.environ.pop(name, None)
    row = run_variant(spec, variant, launch_rank, launch_world)
    if launch_rank == 0:
        harness.write_results(spec["out"], {"rows": [row]})


if __name__ == "__main__":
    main(sys.argv[1])
