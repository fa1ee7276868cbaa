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
from transformers import (BertConfig, BertForSequenceClassification, TrainingArguments,  # noqa: E402
                          default_data_collator)

from sparsecomm.integrations.hf import SparseCommTrainer  # noqa: E402  (imported once here, not in every rank)
from stack_contract import (WireTap, assert_contract, facts, fresh_accelerate_state,  # noqa: E402,F401 (fixture)
                            snapshot)

VOCAB, LENGTH, CLASSES = 40, 12, 3


def tiny_bert():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=LENGTH, num_labels=CLASSES))


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
