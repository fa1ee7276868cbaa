"""PyTorch Lightning: a ``DDPStrategy`` carrying the masked all-reduce hook and its state, and the
masked optimizer for ``configure_optimizers``.

Usage (``torchrun --nproc_per_node N script.py``, or Lightning's own launcher)::

    from sparsecomm.integrations.lightning import SparseCommStrategy, masked_optimizer

    class Model(L.LightningModule):
        ...
        def configure_optimizers(self):
            return masked_optimizer(self, lr=1e-3)          # MaskedAdamW over the strategy's mask

    strategy = SparseCommStrategy(lambda module: sparsecomm.random_mask(module, density=0.005),
                                  process_group_backend="gloo")
    L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=100).fit(Model(), loader)
    strategy.comm_state.bytes_sent   # 4k bytes per optimizer step and rank (fp32)

The strategy builds the mask when the process group is up and the module sits on its device,
just before Lightning wraps it in DDP (``mask`` may be a ready :class:`~sparsecomm.Mask` or a
function of the LightningModule, e.g. a :func:`sparsecomm.fisher_mask` over this rank's data;
names are the LightningModule's ``named_parameters()``; the function sees rank 0's weights on
every rank, broadcast first as the DDP wrap would). It passes
:func:`~sparsecomm.masked_allreduce_hook` as ``ddp_comm_hook`` and registers it with its
:class:`~sparsecomm.MaskedAllReduceState` (``ddp_comm_state``) on the wrapped model: Lightning's
own registration runs on CUDA only, this one on every device (Gloo on CPU included), and checks
that every rank holds the same mask digest. Lightning then calls ``configure_optimizers``, where
:func:`masked_optimizer` reads that mask.

On the wire, per optimizer step and rank: one all-reduce of k values (4k bytes in fp32, 2k with
``wire_dtype="bf16"``), no index; accumulation steps (``accumulate_grad_batches``) send nothing.
``gradient_clip_val`` is refused (Lightning would clip the optimizer's packed copies, which hold
no gradient then): clip ``self.parameters()`` in ``on_before_optimizer_step`` instead.
"""
from __future__ import annotations

from collections.abc import Callable

try:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy
except ImportError as e:  # an optional dependency: say how to get it
    raise ImportError(f"sparsecomm.integrations.lightning needs lightning ({e}): "
                      f"pip install 'sparsecomm[lightning]'") from e

from ..hook import MaskedAllReduceState, masked_allreduce_hook, register_masked_allreduce
from ..mask import Mask
from ..optim import MaskedAdamW, MaskedSGD
from .common import adopt_rank0_state


class SparseCommStrategy(DDPStrategy):
    """``DDPStrategy`` whose DDP all-reduces only the mask's k gradient entries.

    Args:
        mask: a :class:`~sparsecomm.Mask`, or ``mask(lightning_module) -> Mask`` called on every
            rank once the process group is up (collective functions such as ``fisher_mask`` are fine).
        wire_dtype: ``None`` (the gradients' dtype), ``"bf16"`` or ``"fp16"``.
        fused: one all-reduce per step (True) or one per DDP bucket.
        **kwargs: ``DDPStrategy``'s (``process_group_backend``, ``find_unused_parameters``, ...).

    After setup: ``mask`` and ``comm_state`` (``bytes_sent``, ``dense_bytes``, ``steps``).
    """

    strategy_name = "sparsecomm_ddp"

    def __init__(self, mask: Mask | Callable[[pl.LightningModule], Mask], *, wire_dtype=None, fused: bool = True,
                 **kwargs):
        if "ddp_comm_hook" in kwargs or "ddp_comm_state" in kwargs or "ddp_comm_wrapper" in kwargs:
            raise ValueError("SparseCommStrategy sets ddp_comm_hook and ddp_comm_state itself; drop them")
        if not isinstance(mask, Mask) and not callable(mask):
            raise TypeError(f"mask must be a sparsecomm.Mask or a function module -> Mask, got {type(mask).__name__}")
        super().__init__(ddp_comm_hook=masked_allreduce_hook, **kwargs)
        self._mask_source = mask
        self.mask: Mask | None = None
        self._wire_dtype, self._fused = wire_dtype, fused

    @property
    def comm_state(self) -> MaskedAllReduceState | None:
        return self._ddp_comm_state

    def setup(self, trainer: pl.Trainer) -> None:
        if trainer.gradient_clip_val:
            raise ValueError(f"Trainer(gradient_clip_val={trainer.gradient_clip_val}) would clip the masked "
                             f"optimizer's packed copies, which hold no gradient then; leave it unset and clip "
                             f"self.parameters() in the LightningModule's on_before_optimizer_step")
        super().setup(trainer)

    def configure_ddp(self) -> None:
        module = self.model  # the LightningModule, on its device; the process group is up
        if not isinstance(self._mask_source, Mask):
            adopt_rank0_state(module)  # what the DDP wrap below does anyway: the function scores rank 0's weights
        self.mask = self._mask_source if isinstance(self._mask_source, Mask) else self._mask_source(module)
        if not isinstance(self.mask, Mask):
            raise TypeError(f"SparseCommStrategy's mask function returned {type(self.mask).__name__}, not a Mask")
        super().configure_ddp()

    def _register_ddp_hooks(self) -> None:
        self._ddp_comm_state = register_masked_allreduce(self.model, self.mask, wire_dtype=self._wire_dtype,
                                                         fused=self._fused)


def masked_optimizer(module: pl.LightningModule, optimizer: type = MaskedAdamW, **kwargs) -> MaskedAdamW | MaskedSGD:
    """For ``configure_optimizers``: ``optimizer`` (:class:`~sparsecomm.MaskedAdamW` or
    :class:`~sparsecomm.MaskedSGD`) over the mask of the trainer's :class:`SparseCommStrategy`;
    ``kwargs`` are the optimizer's (``lr``, ``weight_decay``, ...)."""
    strategy = module.trainer.strategy
    if not isinstance(strategy, SparseCommStrategy) or strategy.mask is None:
        raise RuntimeError(f"masked_optimizer needs Trainer(strategy=SparseCommStrategy(...)), got "
                           f"{type(strategy).__name__}: the mask lives in that strategy")
    if optimizer not in (MaskedAdamW, MaskedSGD):
        raise TypeError(f"optimizer must be MaskedAdamW or MaskedSGD, got {getattr(optimizer, '__name__', optimizer)}")
    return optimizer(module, strategy.mask, **kwargs)
