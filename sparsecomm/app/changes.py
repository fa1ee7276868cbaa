"""Where a mask kind's wishes take effect: the trainer hands every :class:`~sparsecomm.app.masks.base.Change`
a kind returns to :class:`ChangeApplier`, the one place that changes the run for a kind.

Applying sends nothing itself; a new mask is handed to the hook collectively (every rank checks
it holds the same mask: one all-gather of its digest), and a swapped-in model gets a new DDP
wrapper (which broadcasts rank 0's weights once, as DDP does at construction).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from .masks.base import Change, MaskKind, watch_local_gradients
from .train_state import TrainState, swap_model, use_mask


class ChangeApplier:
    """Applies a kind's changes to a :class:`~sparsecomm.app.train_state.TrainState`, in this order:
    the task diff's base, a model to train (a new DDP and hook; the counters go on), log records
    and lines, a mask (the hook, the masked optimizer, the task diff's union). The kind's local
    gradient hooks follow the model (:func:`~sparsecomm.app.masks.base.watch_local_gradients`)."""

    def __init__(self, cfg: Mapping, device: torch.device, kind: MaskKind, log, task_diff, model: torch.nn.Module):
        self.cfg, self.device, self.kind, self.log, self.task_diff = cfg, device, kind, log, task_diff
        self.local_grads = watch_local_gradients(kind, model)

    def __call__(self, state: TrainState, change: Change | None, step: int) -> None:
        if change is None:
            return
        if change.base is not None and self.task_diff is not None:
            self.task_diff.set_base(change.base, step)
        if change.model is not None:
            swap_model(state, change.model, self.cfg, self.device, optimizer=change.optimizer,
                       dense_bytes_per_step=change.dense_bytes_per_step)
            self.close()
            self.local_grads = watch_local_gradients(self.kind, state.model)
        for name, fields in change.records:
            self.log.log(name, step, **fields)
        for line in change.lines:
            self.log.info(line)
        if change.mask is not None:
            use_mask(state, change.mask, self.cfg.optim)
            if self.task_diff is not None:
                self.task_diff.set_base(state.model, step)  # the first time only: the weights masked training starts from
                self.task_diff.add_mask(change.mask)

    def close(self) -> None:
        """Remove the local gradient hooks (they hold the kind)."""
        for handle in self.local_grads:
            handle.remove()
        self.local_grads = []
