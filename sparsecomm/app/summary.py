"""The run's summary: the fields every run's ``summary.json`` holds, from the trained state.

Nothing here crosses the network: every rank builds the same dict from what the ranks already
agree on (the mask, the counters the hook keeps identically on every rank, the final
evaluation's all-reduced numbers).
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from sparsecomm import distributed as sdist

from .masks.base import MaskKind
from .schedule import Schedule
from .train_state import TrainState


def run_summary(cfg: Mapping, state: TrainState, kind: MaskKind, schedule: Schedule, final: Mapping[str, float],
                train_s: float, task: str, t0: float, buffer_bytes_per_step: int, *, run_dir: str,
                resumed_from: str | None) -> dict[str, Any]:
    """The summary's fields: what trained (task, mask, schedule, ranks), the mask (k, density,
    digest), the final test accuracy and loss, the times, what the gradients sent (``bytes_sent``)
    against dense DDP (``dense_bytes``), the mask choice's and the buffers' bytes; first the
    ``comm/`` option's own stats (``comm``, ``wire_dtype``, ...)."""
    sync, mask = state.sync, state.mask
    return {
        **sync.stats(), "task": task, "mask": kind.name, "schedule": schedule.name,
        "world_size": sdist.world_size(), "backend": cfg.cluster.backend, "steps": schedule.steps,
        "dense_steps": 0 if kind.dense else schedule.dense_steps,
        "numel": sum(p.numel() for p in state.model.parameters()),
        "k": mask.num_selected if mask is not None else None, "density": mask.density if mask is not None else 1.0,
        "mask_digest": mask.digest() if mask is not None else None,
        "test_acc": final["test_acc"], "test_loss": final["test_loss"],
        "wall_s": time.time() - t0, "train_s": train_s,
        "mask_score_bytes": kind.score_bytes, "buffer_bytes": buffer_bytes_per_step * schedule.steps,
        "run_dir": run_dir,
        "skipped_steps": state.nonfinite.skipped, "resumed_from": resumed_from,
    }
