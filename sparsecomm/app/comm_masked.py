"""``comm=masked``: the library's masked all-reduce hook (:mod:`sparsecomm.hook`) in the app."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from sparsecomm.hook import MaskedAllReduceState, register_masked_allreduce
from sparsecomm.mask import Mask

from .comm_base import GradientSync
from .optimizers import build_optimizer


class MaskedSync(GradientSync):
    """``comm=masked`` (``wire_dtype``, ``fused``): only the entries the mask selects cross.

    Per masked step and rank: the ``k`` selected entries packed, ``k x 4`` bytes in fp32
    (``k x 2`` with ``wire_dtype`` fp16/bf16), in one all-reduce (``fused``) or one per bucket
    holding selected entries; no index travels. Dense steps (warm-up, core/full "full" steps)
    send all ``n`` entries through the same hook, ``n x 4`` bytes (x 2 with a 2-byte wire).

    The hook is registered once with a full mask in dense mode, switched to the kind's mask by
    :meth:`set_mask` and between masked and dense per step by :meth:`set_dense`, never
    re-registered. Memory between steps: one int64 per selected entry (the packing plans).
    """

    name = "masked"
    uses_mask = True

    def _register(self) -> MaskedAllReduceState:
        state = register_masked_allreduce(self.ddp, Mask.full(self.ddp.module), wire_dtype=self.cfg.wire_dtype,
                                          fused=bool(self.cfg.fused))
        state.dense = True
        self.wire_dtype = self.cfg.wire_dtype
        return state

    def set_mask(self, mask: Mask) -> None:
        """Collective: every rank must hold ``mask`` (an error lists the digests otherwise)."""
        self.tally.set_mask(mask)

    def set_dense(self, dense: bool) -> None:
        self.tally.dense = dense

    def optimizer(self, optim: Mapping, mask: Mask | None = None) -> tuple[torch.optim.Optimizer, float]:
        """``(optimizer, base lr)``: the masked one over ``mask``'s k entries at ``optim.lr``; without
        a mask (dense steps) ``optim/``'s dense one at ``optim.dense_lr``."""
        return build_optimizer(optim, self.ddp.module, mask)

    def _count_step(self) -> None:
        """The hook counts its bytes, steps and dense DDP's bytes of this module itself; with
        ``dense_bytes_per_step`` a step counts as dense DDP of the plain model instead."""
        self.tally.dense_bytes += self._dense_per_step - self.grad_bytes

    def found_nonfinite(self, model: torch.nn.Module) -> bool:
        """The hook's flag over the reduced values (k entries, or n on dense steps), no extra traffic."""
        return self.tally.found_nonfinite()

    def option_stats(self) -> dict[str, Any]:
        hook = self.tally.stats()
        return {"fused": bool(self.cfg.fused), "plans": hook.plans, "state_bytes": hook.plan_bytes}

    def option_state(self) -> dict[str, Any]:
        """Whether steps are dense; the mask's digest is left out (a checkpoint stores the mask once)."""
        return {"dense": self.tally.dense}

    def load_option_state(self, sd: Mapping[str, Any]) -> None:
        """Call after :meth:`set_mask` with the checkpoint's mask."""
        self.tally.dense = bool(sd["dense"])
