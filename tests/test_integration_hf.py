"""sparsecomm.integrations.hf: a Hugging Face Trainer on 2 Gloo ranks keeps the core contract
(tests/stack_contract.py): k fp32 values per optimizer step on the wire (counted by the hook and
by a tap on all-reduce), nothing outside the mask changed, optimizer state of 2k entries, one
mask digest on every rank. A tiny BERT built here from a BertConfig; nothing is downloaded."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from multirank import run_ranks  # noqa: E402
from transformers import (BertConfig, BertForSequenceClassification, Trainer, TrainerCallback,  # noqa: E402
                          TrainingArguments, default_data_collator)

from sparsecomm.integrations.hf import SparseCommTrainer  # noqa: E402  (imported once here, not in every rank)
from sparsecomm.mask import random_mask  # noqa: E402
from stack_contract import (WireTap, assert_contract, facts, fresh_accelerate_state,  # noqa: E402,F401 (fixture)
                            snapshot)
from update_reference import assert_params_close, masked_sgd_reference  # noqa: E402

pytestmark = pytest.mark.slow  # 2-rank Trainer runs of a tiny BERT: about 5 s each

VOCAB, LENGTH, CLASSES = 40, 12, 3


def tiny_bert(dropout: float = 0.1):
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=LENGTH, num_labels=CLASSES, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout))


def examples(n: int = 64) -> list[dict]:
    """Labelled token sequences of varying length (padded to LENGTH): the label is the first token mod 3."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        length = int(torch.randint(4, LENGTH + 1, (1,), generator=g))
        ids = torch.zeros(LENGTH, dtype=torch.long)
        ids[:length] = torch.randint(1, VOCAB, (length,), generator=g)
        keep = (torch.arange(LENGTH) < length).long()
        out.append({"input_ids": ids, "attention_mask": keep, "labels": int(ids[0]) % CLASSES})
    return out


def join_as_torchrun(rank: int, world: int) -> None:
    """The variables torchrun sets, which Accelerate reads (the process group itself is already up)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29500", OMP_NUM_THREADS="1")


def train_rank(rank, world, out_dir, mask_kind, accumulation, bf16, find_unused, steps):
    join_as_torchrun(rank, world)
    model = tiny_bert()
    before = snapshot(model)
    args = TrainingArguments(out_dir, max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
                             gradient_accumulation_steps=accumulation, use_cpu=True,
                             ddp_find_unused_parameters=find_unused,
                             report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
                             bf16=bf16)
    trainer = SparseCommTrainer(model=model, args=args, train_dataset=examples(), data_collator=default_data_collator,
                                mask_kind=mask_kind, density=0.05, mask_samples=16, always=["classifier.*"])
    with WireTap() as tap:
        trainer.train()
    assert type(trainer.model_wrapped).__name__ == "DistributedDataParallel"
    out = facts(model, before, trainer.mask, trainer.comm_state, trainer.optimizer, tap)
    out["head_kept"] = bool(trainer.mask["classifier.weight"].all() and trainer.mask["classifier.bias"].all())
    return out


@pytest.mark.parametrize("mask_kind,accumulation,bf16,find_unused",
                         [("fisher", 2, False, False), ("random", 1, True, None)])
def test_trainer_sends_k_values_per_step_and_freezes_the_rest(tmp_path, mask_kind, accumulation, bf16, find_unused):
    """bf16 autocast: the forward runs in bf16, the gradients (and the wire) stay in the parameters' fp32.
    ``ddp_find_unused_parameters=None``: the Trainer's default, True for a PreTrainedModel."""
    steps = 3
    results = run_ranks(train_rank, 2, str(tmp_path), mask_kind, accumulation, bf16, find_unused, steps, timeout=240)
    numbers = assert_contract(results, steps=steps)
    assert all(r["head_kept"] for r in results)
    assert numbers["bytes_per_step"] == 4 * numbers["k"] < numbers["dense_bytes_per_step"]


def test_one_process_trainer_trains_the_mask_without_a_hook(tmp_path):
    model = tiny_bert()
    before = snapshot(model)
    args = TrainingArguments(str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                             use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True)
    trainer = SparseCommTrainer(model=model, args=args, train_dataset=examples(16),
                                data_collator=default_data_collator, mask_kind="random", density=0.05)
    trainer.train()
    assert trainer.comm_state is None
    for name, p in model.named_parameters():
        assert torch.equal(p.detach()[~trainer.mask[name]], before[name][~trainer.mask[name]]), name


def test_refuses_what_it_cannot_honour(tmp_path):
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match="mask_kind='diff' is not a mask kind"):
        SparseCommTrainer(model=tiny_bert(), args=args, mask_kind="diff")
    dense = torch.optim.AdamW(tiny_bert().parameters())
    with pytest.raises(ValueError, match="drop the optimizer"):
        SparseCommTrainer(model=tiny_bert(), args=args, optimizers=(dense, None))
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to="none", optim="adafactor")
    trainer = SparseCommTrainer(model=tiny_bert(), args=args, mask_kind="random", density=0.05)
    with pytest.raises(ValueError, match="optim='adafactor' has no masked counterpart"):
        trainer.create_optimizer()


SGD_LR = 0.5


class MaskTheGradient(TrainerCallback):
    """Stock DDP, then the gradient multiplied by the mask before each optimizer step."""

    def __init__(self, model, mask):
        self.model, self.mask = model, mask

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        for name, p in self.model.named_parameters():
            p.grad.mul_(self.mask[name])


def recording(cls):
    class Recording(cls):
        """Records the micro-batches this rank trains on."""

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.seen.append({k: v.clone() for k, v in inputs.items()})
            return super().training_step(model, inputs, num_items_in_batch)
    return Recording


def summed_loss(outputs, labels, num_items_in_batch):
    """A loss normalised as the Trainer expects: summed over examples, divided by the examples in
    the whole step (every rank's, every accumulated micro-batch's)."""
    return torch.nn.functional.cross_entropy(outputs.logits, labels, reduction="sum") / num_items_in_batch


def sgd_rank(rank, world, out_dir, integration, accumulation, loss_mode, steps):
    """``steps`` SGD steps (no momentum, constant lr, no clipping) of a dropout-free tiny BERT,
    through SparseCommTrainer or the stock Trainer with the gradient masked by a callback.
    ``loss_mode``: ``"default"``; ``"no_token_average"``: ``average_tokens_across_devices=False``;
    ``"no_loss_kwargs"``: ``trainer.model_accepts_loss_kwargs = False`` (the loss then is the model's mean);
    ``"summed"``: a ``compute_loss_func`` that sums the examples' losses and divides by ``num_items_in_batch``."""
    join_as_torchrun(rank, world)
    model = tiny_bert(dropout=0.0)
    mask = random_mask(model, density=0.2, seed=3)
    args = TrainingArguments(out_dir, max_steps=steps, per_device_train_batch_size=4, learning_rate=SGD_LR,
                             optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
                             gradient_accumulation_steps=accumulation, use_cpu=True,
                             ddp_find_unused_parameters=False, report_to="none", save_strategy="no",
                             logging_strategy="no", disable_tqdm=True, seed=0,
                             average_tokens_across_devices=loss_mode != "no_token_average")
    common = dict(model=model, args=args, train_dataset=examples(), data_collator=default_data_collator,
                  compute_loss_func=summed_loss if loss_mode == "summed" else None)
    if integration == "sparsecomm":
        trainer = recording(SparseCommTrainer)(mask=mask, **common)
    else:
        trainer = recording(Trainer)(callbacks=[MaskTheGradient(model, mask)], **common)
    trainer.seen = []
    if loss_mode == "no_loss_kwargs":
        trainer.model_accepts_loss_kwargs = False
    logged = trainer.train().training_loss  # what the Trainer reports: its loss per optimizer step
    return snapshot(model), trainer.seen, {name: mask[name].clone() for name, _ in model.named_parameters()}, logged


@pytest.mark.parametrize("accumulation,loss_mode", [(2, "default"), (2, "no_token_average"), (2, "no_loss_kwargs"),
                                                       (2, "summed")])
def test_masked_sgd_update_matches_stock_ddp_on_the_mask(tmp_path, accumulation, loss_mode):
    """The update equals (a) the stock Trainer under DDP with the gradient masked before the step and
    (b) the mean over ranks and micro-batches of plain-autograd gradients on the mask, times the
    factor the Trainer itself puts into the loss: for a model that takes loss kwargs (BERT does) but
    returns a mean loss, the Trainer multiplies the loss by the world size (``average_tokens_across_devices``,
    the default) and does not divide it by the accumulation steps: world x accumulation; with
    ``average_tokens_across_devices=False``: accumulation; with ``model_accepts_loss_kwargs=False``: 1; with a
    loss normalised by ``num_items_in_batch`` (what the factor is meant for): 1."""
    steps, world = 2, 2
    ours = run_ranks(sgd_rank, world, str(tmp_path), "sparsecomm", accumulation, loss_mode, steps, timeout=240)
    stock = run_ranks(sgd_rank, world, str(tmp_path), "stock", accumulation, loss_mode, steps, timeout=240)
    mask = ours[0][2]
    seen = [r[1] for r in ours]
    assert all(len(s) == steps * accumulation for s in seen)
    plan = [[seen[r][s * accumulation:(s + 1) * accumulation] for r in range(world)] for s in range(steps)]
    scale = {"default": world * accumulation, "no_token_average": accumulation, "no_loss_kwargs": 1,
             "summed": 1}[loss_mode]

    def loss_of(model, batch):
        return model(**batch).loss

    before = snapshot(tiny_bert(dropout=0.0))
    want, losses = masked_sgd_reference(tiny_bert(dropout=0.0), plan, loss_of, mask, SGD_LR, scale=scale)
    for params, *_ in ours + stock:
        assert_params_close(params, want, before)
    # the reported loss carries the same factor, in stock DDP too (train()'s result: this rank's steps)
    for rank, r in enumerate(ours + stock):
        mean = sum(step[rank % world] for step in losses) / steps
        assert r[3] == pytest.approx(scale * mean, rel=1e-4)


def fisher_mask_rank(rank, world, out_dir, own_head):
    """The Fisher mask SparseCommTrainer builds; ``own_head``: every rank but 0 re-initialises the
    classifier its own way (as ``from_pretrained`` does for a new head in unseeded processes)."""
    join_as_torchrun(rank, world)
    model = tiny_bert(dropout=0.0)
    if own_head and rank > 0:
        torch.manual_seed(100 + rank)
        model.classifier.reset_parameters()
    args = TrainingArguments(out_dir, per_device_train_batch_size=4, use_cpu=True, report_to="none", seed=0)
    trainer = SparseCommTrainer(model=model, args=args, train_dataset=examples(), data_collator=default_data_collator,
                                mask_kind="fisher", density=0.05, mask_samples=16)
    trainer.create_optimizer()
    return trainer.mask.digest()


def test_fisher_mask_scores_rank0_weights_when_ranks_initialised_apart(tmp_path):
    """Reference: the same run with every rank holding rank 0's weights from the start."""
    apart = run_ranks(fisher_mask_rank, 2, str(tmp_path), True, timeout=120)
    same = run_ranks(fisher_mask_rank, 2, str(tmp_path), False, timeout=120)
    assert apart == same and len(set(same)) == 1
