"""A mask kind's part in the run: asked at each point of a step, its changes applied here.

:class:`KindSteps` asks the kind (and the schedule) around each step of a
:class:`~sparsecomm.app.train_state.TrainState`, handing it a :class:`~sparsecomm.app.masks.base.View`;
:class:`ChangeApplier` is the one place a :class:`~sparsecomm.app.masks.base.Change` it returns
takes effect. Neither sends anything itself; a new mask is handed to the hook collectively (every
rank checks it holds the same mask and config: all-gathers of their digests), and a swapped-in
model gets a new DDP wrapper (which broadcasts rank 0's weights once, as DDP does at construction).
"""
from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import torch

from sparsecomm import distributed as sdist
from sparsecomm.mask import Mask

from . import writes
from .masks.base import Change, MaskKind, View, watch_local_gradients
from .masks.dense import DenseKind
from .monitor import log_mask
from .run_state import MaskState
from .schedule import Schedule
from .task_diff import TaskDiffRecorder
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
                # the first time only: the weights masked training starts from
                self.task_diff.set_base(state.model, step)
                self.task_diff.add_mask(change.mask)

    def close(self) -> None:
        """Remove the local gradient hooks (they hold the kind)."""
        for handle in self.local_grads:
            handle.remove()
        self.local_grads = []


class KindSteps:
    """The schedule and the kind around each step of a state: a new mask when due (rank 0 saves
    it), dense or masked, the kind's points with a :class:`View`, their changes applied
    (``apply``, a :class:`ChangeApplier`).

    ``setting``: ``(task, data, device)``, what every view shows besides the state; ``config_hash``:
    checked on every rank at each new mask; ``run_dir``: where rank 0 saves ``mask.safetensors``.
    """

    def __init__(self, kind: MaskKind, schedule: Schedule, apply: ChangeApplier, *, setting: tuple[Any, Any, Any],
                 run_dir: str, config_hash: str):
        self.kind, self.schedule, self.apply, self.setting = kind, schedule, apply, setting
        self.log, self.run_dir, self.config_hash = apply.log, run_dir, config_hash

    @classmethod
    def build(cls, cfg: Mapping, kind: MaskKind, schedule: Schedule, model: torch.nn.Module,
              setting: tuple[Any, Any, Any], log, *, run_dir: str, config_hash: str) -> KindSteps:
        """The run's: ``cfg`` the run's config, ``model`` its initial model, ``setting`` (task, data,
        device); a kind with a mask records the task diff (:class:`~sparsecomm.app.task_diff.TaskDiffRecorder`)
        when ``save_diff`` asks for it: its base is one more copy of the model."""
        task_diff = TaskDiffRecorder(template=model) if cfg.save_diff and not kind.dense else None
        return cls(kind, schedule, ChangeApplier(cfg, setting[2], kind, log, task_diff, model), setting=setting,
                   run_dir=run_dir, config_hash=config_hash)

    @property
    def task_diff(self) -> TaskDiffRecorder | None:
        return self.apply.task_diff

    def sends_dense(self, step: int) -> bool:
        """Whether ``step`` sends dense gradients (per the schedule; always for a kind without a mask)."""
        return self.kind.dense or self.schedule.sends_dense(step)

    def view(self, state: TrainState, step: int, dense: bool = False) -> View:
        """What the kind reads at ``step`` of ``state``."""
        return View(state.model, step, dense, state.sync.bytes_sent, state.sync.grad_bytes, *self.setting)

    def before(self, state: TrainState, step: int) -> bool:
        """Before ``step``: a new mask when due, the step's mode, the kind's change. True: a dense step."""
        if self.kind.dense:
            return True
        if self.schedule.mask_due(step):
            self.new_mask(state, step)
        dense = self.schedule.sends_dense(step)
        if self.task_diff is not None and self.schedule.is_full_step(step):
            self.task_diff.full_step(step)
        change = self.kind.before_step(self.view(state, step, dense))  # diff pruning may swap the model here
        self.apply(state, change, step)
        dense = dense if change is None or change.dense is None else change.dense
        state.sync.set_dense(dense)
        return dense

    def after_backward(self, state: TrainState, step: int, dense: bool) -> None:
        """After ``step``'s backward and all-reduce, before the update: the kind reads (statistics)."""
        self.kind.after_backward(self.view(state, step, dense))

    def after(self, state: TrainState, step: int, dense: bool) -> None:
        """After ``step``'s update: the kind's change (the width core re-zeroes its cut weights)."""
        self.apply(state, self.kind.after_step(self.view(state, step, dense)), step)

    def new_mask(self, state: TrainState, step: int) -> None:
        """The kind's mask for ``step`` (collective), applied; rank 0 saves it; logged."""
        t = time.perf_counter()
        self.apply(state, self.kind.new_mask(self.view(state, step)), step)
        assert_same_config(self.config_hash)
        digest = save_mask(state.mask, self.run_dir) if sdist.is_main_process() else state.mask.digest()
        log_mask(self.log, self.kind.name, state.mask, digest, step, time.perf_counter() - t)

    def plain(self, data) -> KindSteps:
        """The steps of a plain dense run on ``data`` (a kind's comparison): no mask, no kind's change."""
        kind = DenseKind({"always": []}, self.kind.setting)
        return KindSteps(kind, self.schedule, self.apply, setting=(self.setting[0], data, self.setting[2]),
                         run_dir=self.run_dir, config_hash=self.config_hash)

    def before_load(self, state: TrainState, header: Mapping[str, Any]) -> None:
        """Before a checkpoint loads (``header``: its header): its step, the kind's change (diff pruning's L0 model)."""
        step = int(header["step"])
        self.apply(state, self.kind.before_load(self.view(state, step)), step)
        state.step = step

    def after_load(self, state: TrainState) -> None:
        """After a checkpoint loaded (collective): every rank runs the same config and holds the same
        mask, or the run stops listing the digests; rank 0 saves the mask (the run folder may be new)."""
        assert_same_config(self.config_hash)
        sdist.assert_same_on_all_ranks(state.mask.digest() if state.mask is not None else "none", "mask digest",
                                       fix="Every rank must load the same checkpoint.")
        if state.mask is not None and sdist.is_main_process():
            save_mask(state.mask, self.run_dir)

    def mask_state(self, state: TrainState) -> MaskState:
        """The checkpoint component of ``state``'s mask; a loaded mask is checked against the model
        and goes to the hook (collective) and the masked optimizer."""
        return MaskState(lambda: state.mask, lambda mask: use_mask(state, mask, self.apply.cfg.optim, validate=True))

    def outputs(self, state: TrainState, *, save_diff: bool) -> Change:
        """The end (collective): the task diff (rank 0 writes it when ``save_diff``), then the kind's
        outputs, its records and lines applied; ``fields``: the summary fields of both."""
        diff = {}
        if save_diff and self.task_diff is not None:
            diff = self.task_diff.write(state.model, self.run_dir, self.log)  # rank 0 writes it
        change = self.kind.outputs(self.view(state, state.step))
        self.apply(state, change, state.step)
        change.fields = {**diff, **change.fields}
        return change


def save_mask(mask: Mask, run_dir: str) -> str:
    """Rank 0: ``mask.safetensors`` (one byte per entry); returns the mask's digest."""
    path = os.path.join(run_dir, "mask.safetensors")
    with writes.writing(path, needed=mask.numel):
        return mask.save(path)


def assert_same_config(digest: str) -> None:
    """Collective: stop, listing every rank's hash, unless all ranks run the same config."""
    sdist.assert_same_on_all_ranks(digest, "config hash", fix="Start every rank with the same config and overrides.")
