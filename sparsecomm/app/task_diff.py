"""The task diff written at the end of a masked run: ``task_diff.safetensors`` (:mod:`sparsecomm.diff`).

Rank 0 writes it (and ``base.safetensors`` when the base is the model after a dense warm-up);
nothing travels but the few bytes of the report rank 0 broadcasts so every rank returns it.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

import torch

from sparsecomm import diff as sdiff
from sparsecomm import distributed as sdist
from sparsecomm.mask import Mask

from . import writes
from .metrics import human_bytes


class TaskDiffRecorder:
    """What the end-of-run task diff needs: the base weights and every mask the run trained with.

    The base is the model the first masked step started from (the initial/pretrained model, or the
    model after ``schedule.dense_steps`` warm-up steps; for diff pruning the frozen base of the L0
    phase). Every later change went through a masked optimizer over one of the masks, so the union
    of the masks covers it; a core/full "full" step updates the whole model, and the diff is then
    skipped with that reason.
    """

    def __init__(self, template: torch.nn.Module | None = None) -> None:
        self.template = template  # a model of the base's architecture, to rebuild the base on resume
        self.base: torch.nn.Module | None = None
        self.base_step: int | None = None
        self.union = None
        self.skip_reason: str | None = None

    # its part of a checkpoint (the component ``task_diff``): the base weights and the masks so far
    def state_dict(self) -> dict[str, Any]:
        return {"base": {k: v.detach().cpu().clone() for k, v in self.base.state_dict().items()}
                if self.base is not None else None,
                "base_step": self.base_step, "skip_reason": self.skip_reason,
                "union": {n: self.union[n] for n in self.union} if self.union is not None else None}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        self.base = None
        if sd["base"] is not None:
            self.base = copy.deepcopy(self.template)
            self.base.load_state_dict(sd["base"])
        self.base_step, self.skip_reason = sd["base_step"], sd["skip_reason"]
        self.union = Mask(sd["union"]) if sd["union"] is not None else None

    def set_base(self, model: torch.nn.Module, step: int) -> None:
        if self.base is None:
            self.base = copy.deepcopy(model)
            self.base_step = int(step)

    def add_mask(self, mask) -> None:
        self.union = mask if self.union is None else self.union.union(mask)

    def full_step(self, step: int) -> None:
        if self.skip_reason is None:
            self.skip_reason = (f"step {step} was a core/full 'full' step (dense update of the whole model), "
                                f"so the run's change is not sparse")

    def write(self, model: torch.nn.Module, run_dir: str, log=None) -> dict[str, Any]:
        """Rank 0: write ``task_diff.safetensors`` (and ``base.safetensors`` when the base is not the
        initial model); every rank returns the same report (rank 0's, broadcast: a few bytes).
        ``log``: where a diff that is not written says why."""
        written: list[dict[str, Any]] = []
        sdist.rank0_decides(lambda: written.append(self._write(model, run_dir)), writes.WriteError)
        report = sdist.broadcast_from_rank0(written[0] if written else None)
        if log is not None and report.get("task_diff_skipped"):
            log.info(f"task diff not written: {report['task_diff_skipped']}")
        return report

    def _write(self, model: torch.nn.Module, run_dir: str) -> dict[str, Any]:
        if self.skip_reason is not None or self.base is None or self.union is None:
            return {"task_diff": None, "task_diff_skipped": self.skip_reason or "no mask was used"}
        path = os.path.join(run_dir, "task_diff.safetensors")
        try:
            with writes.writing(path):
                sdiff.save(model, self.base, self.union, path)
        except sdiff.LossyDiff as e:  # a bug, not a setting: say so in the summary instead of dying at the end
            return {"task_diff": None, "task_diff_skipped": f"not sparse: {e}"}
        size = sdiff.size_report(path)
        report = {"task_diff": path, "task_diff_bytes": size["file_bytes"],
                  "full_model_bytes": size["full_model_bytes"], "task_diff_ratio": size["ratio"],
                  "task_diff_entries": size["num_selected"], "task_diff_base": "initial model"}
        if self.base_step:
            base_path = os.path.join(run_dir, "base.safetensors")
            writes.save_model_atomic(self.base, base_path)
            report["task_diff_base"] = f"{base_path} (the weights sparse training started from, at step {self.base_step})"
        return report


def report_lines(s: Mapping[str, Any]) -> list[str]:
    """The end-of-run report's line about the task diff (none for dense runs)."""
    if "task_diff_bytes" in s:
        return [f"  task diff        {human_bytes(s['task_diff_bytes'])} ({s['task_diff_entries']:,} entries) vs "
                f"full model {human_bytes(s['full_model_bytes'])} (ratio {s['task_diff_ratio']:.4f}); "
                f"base: {s['task_diff_base']}"]
    if s.get("task_diff_skipped"):
        return [f"  task diff        not written: {s['task_diff_skipped']}"]
    return []
