"""The end-of-run report a user reads (rank 0 prints it and writes it to ``log.txt``)."""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch

from sparsecomm.checkpoint import write_atomic

from . import task_diff, writes
from .masks import MASK_KINDS
from .metrics import human_bytes


def publish(summary: Mapping[str, Any], model: torch.nn.Module | None, run_dir: str, cluster: Mapping, log) -> None:
    """Rank 0: ``model.safetensors`` (unless ``model`` is None), then ``summary.json``, whose
    presence marks the run finished (:mod:`sparsecomm.app.rundir`); prints the report and adds it
    to ``log.txt``. Each file is written to a temporary name and renamed."""
    if model is not None:
        writes.save_model_atomic(model, os.path.join(run_dir, "model.safetensors"))
    path, text = os.path.join(run_dir, "summary.json"), json.dumps(summary, indent=2).encode()
    with writes.writing(path, needed=len(text)):
        write_atomic(path, text)
    report = format_summary(summary, cluster)
    log.write_log(report)
    print(report, flush=True)


def format_summary(s: Mapping[str, Any], cluster: Mapping | None = None) -> str:
    """The end-of-run report a user reads."""
    comm = s.get("comm", "masked")
    if s["mask"] == "unused":  # comm sends every entry (dense, fp16, powersgd, ...)
        mask = f"comm={comm}, every entry trains (mask unused)"
    elif s["mask"] == "dense":
        mask = "dense (plain DDP)"
    else:
        mask = f"{s['mask']} mask, k={s['k']:,} of {s['numel']:,} (density {s['density']:.4g})"
    lines = [
        f"== sparsecomm summary: {s['task']} | {mask} | {s['world_size']} ranks ({s['backend']}) | "
        f"{s['steps']} steps ({s['dense_steps']} dense) ==",
        f"  test accuracy    {s['test_acc']:.4f}",
        f"  wall time        {s['wall_s']:.1f} s (training loop {s['train_s']:.1f} s)",
        f"  sent by the hook {human_bytes(s['bytes_sent'])}  (gradient all-reduce payload per rank)",
        f"  dense DDP        {human_bytes(s['dense_bytes'])}  for the same steps",
    ]
    if s["dense_bytes"]:
        ratio = s["ratio"]
        fewer = f"  ({1 / ratio:.1f}x fewer bytes)" if 0 < ratio < 1 else ""
        lines.append(f"  ratio            {ratio:.4f}{fewer}")
    if s["mask_score_bytes"]:
        lines.append(f"  mask scores      {human_bytes(s['mask_score_bytes'])}  (choosing and refreshing the mask: the "
                     f"scores the ranks exchange, per rank)")
    if s.get("buffer_bytes"):
        lines.append(f"  buffers          {human_bytes(s['buffer_bytes'])}  (module buffers, e.g. BatchNorm "
                     f"statistics, that DDP broadcasts from rank 0 every step, dense or not)")
    link = _link_gbit(cluster, s["world_size"]) if cluster is not None else None
    if link and s["world_size"] > 1:
        ring = 2 * (s["world_size"] - 1) / s["world_size"] / (link * 1e9 / 8)
        lines.append(f"  at {link:g} Gbit/s    ~{s['bytes_sent'] * ring:.3g} s on the wire "
                     f"(dense DDP ~{s['dense_bytes'] * ring:.3g} s), ring all-reduce estimate")
    if s["mask"] in MASK_KINDS:  # diff pruning's L0 phase, the width core alone
        lines += MASK_KINDS[s["mask"]].report_lines(s)
    lines += task_diff.report_lines(s)
    lines.append(f"  outputs          {s['run_dir']}")
    return "\n".join(lines)


def _link_gbit(cluster: Mapping, world: int) -> float | None:
    link = cluster.get("link") or {}
    nnodes = int(cluster.get("nnodes", 1)) if str(cluster.get("nnodes", 1)).isdigit() else 1
    value = link.get("inter_node_gbit") if nnodes > 1 else link.get("intra_node_gbit")
    return float(value) if value else None
