"""Hugging Face Transformers: a ``Trainer`` that trains and sends only the mask's k entries.

Usage (under ``torchrun --nproc_per_node N``; on a machine without GPU, ``use_cpu=True`` is what
makes the Trainer wrap the model in DDP over Gloo)::

    from sparsecomm.integrations.hf import SparseCommTrainer

    args = TrainingArguments("out", max_steps=100, learning_rate=1e-3, use_cpu=True,
                             ddp_find_unused_parameters=False)
    trainer = SparseCommTrainer(model=model, args=args, train_dataset=train, data_collator=collator,
                                density=0.005, always=["classifier.*"])
    trainer.train()
    trainer.comm_state.bytes_sent   # 4k bytes per optimizer step and rank (fp32)

What it does, in the Trainer's own order:

1. ``create_optimizer`` (before the Trainer wraps the model): the mask, unless one was given, is
   built from the training data: :func:`sparsecomm.fisher_mask` on ``mask_samples`` examples of
   ``train_dataset`` collated by the Trainer's ``data_collator`` (rank r scores examples r, r+N,
   ...; batches must hold ``labels``; classification loss; every rank scores rank 0's weights,
   broadcast first), or ``mask_kind="random"``
   (:func:`sparsecomm.random_mask`, seeded by ``args.seed``). Then a :class:`~sparsecomm.MaskedAdamW`
   (``args.optim`` adamw_*) or :class:`~sparsecomm.MaskedSGD` (``sgd``) with the arguments'
   learning rate, betas, epsilon and weight decay (one group: the mask's entries).
2. ``training_step``, the first time (after Accelerate wrapped the model in DDP, before the
   first backward): :func:`sparsecomm.register_masked_allreduce` on the wrapped model, which also
   checks that every rank holds the same mask digest. ``comm_state`` is its state.

On the wire, per optimizer step and rank: one all-reduce of k values (4k bytes in fp32, 2k with
``wire_dtype="bf16"``), no index. Gradient accumulation steps (``no_sync``) send nothing. With
``ddp_find_unused_parameters=True`` (the Trainer's default for a ``PreTrainedModel``) DDP also
all-reduces a flag per parameter tensor each step: set it False when every parameter is used.
The learning-rate scheduler, gradient clipping and bf16 autocast work as usual; fp16 (a
GradScaler) is refused: the scaler cannot see the packed gradients.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Subset

try:
    from transformers import Trainer
except ImportError as e:  # an optional dependency: say how to get it
    raise ImportError(f"sparsecomm.integrations.hf needs transformers ({e}): pip install 'sparsecomm[hf]'") from e

from .. import distributed as sdist
from ..fisher import fisher_mask
from ..hook import register_masked_allreduce
from ..mask import Mask, random_mask
from ..optim import MaskedAdamW, MaskedSGD
from .common import adopt_rank0_state, classification_loss, require_ddp_when_distributed, split_labels

MASK_KINDS = ("fisher", "random")


class SparseCommTrainer(Trainer):
    """A ``transformers.Trainer`` whose DDP all-reduces only the mask's k gradient entries and whose
    optimizer updates only them (every other entry stays bit-identical).

    Args (besides the Trainer's own):
        mask: a ready :class:`~sparsecomm.Mask` (names of the model's ``named_parameters()``);
            ``None``: built from the training data at the start of ``train()``.
        mask_kind: ``"fisher"`` or ``"random"``, when ``mask`` is None.
        density: fraction of the model's entries trained and sent (k = round(density x n)).
        mask_samples: examples scored for the Fisher mask, over all ranks.
        always: glob patterns of parameters kept whole (e.g. ``["classifier.*"]``); they count toward k.
        wire_dtype: ``None`` (the gradients' dtype), ``"bf16"`` or ``"fp16"``.

    After ``train()``: ``mask``, ``comm_state`` (a :class:`~sparsecomm.MaskedAllReduceState`:
    ``bytes_sent``, ``dense_bytes``, ``steps``; ``None`` in a one-process run, which sends nothing).
    """

    def __init__(self, *args, mask: Mask | None = None, mask_kind: str = "fisher", density: float = 0.005,
                 mask_samples: int = 256, always: Iterable[str] = (), wire_dtype=None, **kwargs):
        super().__init__(*args, **kwargs)
        if mask_kind not in MASK_KINDS:
            raise ValueError(f"mask_kind={mask_kind!r} is not a mask kind of SparseCommTrainer; "
                             f"use one of {MASK_KINDS}")
        if self.optimizer is not None and not isinstance(self.optimizer, (MaskedAdamW, MaskedSGD)):
            raise ValueError("SparseCommTrainer builds a masked optimizer from TrainingArguments; drop the optimizer "
                             "passed in optimizers=(...), or pass a sparsecomm MaskedAdamW/MaskedSGD")
        if self.args.fp16:
            raise ValueError("TrainingArguments.fp16=True uses a GradScaler, which cannot see the masked optimizer's "
                             "packed gradients; use bf16=True or full precision")
        if isinstance(self.optimizer, (MaskedAdamW, MaskedSGD)):
            mask = mask if mask is not None else self.optimizer.mask
        self.mask = mask
        self.mask_kind, self.density, self.mask_samples = mask_kind, density, int(mask_samples)
        self.always, self.wire_dtype = tuple(always), wire_dtype
        self.comm_state = None
        self._hook_checked = False

    # --- the mask and the optimizer: before the Trainer wraps the model --------------------------
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            if self.mask is None:
                self.mask = self.build_mask()
            self.optimizer = self._masked_optimizer()
        return self.optimizer

    def build_mask(self) -> Mask:
        """The mask of ``mask_kind`` over ``self.model``; collective (every rank calls it). The Fisher
        mask scores rank 0's weights (broadcast first, as DDP's wrap would later)."""
        if self.mask_kind == "random":
            return random_mask(self.model, density=self.density, seed=self.args.seed, always=self.always)
        adopt_rank0_state(self.model)
        return fisher_mask(self.model, split_labels(self._fisher_batches()), classification_loss,
                           density=self.density, num_samples=self.mask_samples, always=self.always)

    def _fisher_batches(self) -> Iterator[dict]:
        """This rank's share of the first ``mask_samples`` training examples, collated as training
        collates them (columns the model does not take removed), on the model's device."""
        if self.train_dataset is None:
            raise ValueError("SparseCommTrainer: the Fisher mask is built from train_dataset, which is None")
        world, rank = sdist.world_size(), sdist.rank()
        n = min(self.mask_samples, len(self.train_dataset))
        collate = self._get_collator_with_removed_columns(self.data_collator, description="Fisher mask")
        loader = DataLoader(Subset(self.train_dataset, range(rank, n, world)),
                            batch_size=self.args.per_device_train_batch_size, collate_fn=collate)
        device = next(self.model.parameters()).device
        for batch in loader:
            yield {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def _masked_optimizer(self):
        a = self.args
        name = str(getattr(a.optim, "value", a.optim))
        if name.startswith("adamw"):
            return MaskedAdamW(self.model, self.mask, lr=a.learning_rate, betas=(a.adam_beta1, a.adam_beta2),
                               eps=a.adam_epsilon, weight_decay=a.weight_decay)
        if name == "sgd":
            return MaskedSGD(self.model, self.mask, lr=a.learning_rate, weight_decay=a.weight_decay)
        raise ValueError(f"TrainingArguments.optim={name!r} has no masked counterpart; use an adamw_* optimizer "
                         f"(MaskedAdamW) or 'sgd' (MaskedSGD)")

    # --- the hook: on the wrapped model, before the first backward -------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self._hook_checked:
            self._hook_checked = True
            if require_ddp_when_distributed(model, "the Trainer", "on a machine without GPU pass "
                                                   "TrainingArguments(use_cpu=True) so that it wraps over Gloo"):
                self.comm_state = register_masked_allreduce(model, self.mask, wire_dtype=self.wire_dtype)
        return super().training_step(model, inputs, num_items_in_batch)
