"""Fine-tune the packaged all-MiniLM-L6-v2 on WordNet noun supersenses with Hugging Face's Trainer,
training and sending only a FISH mask's k entries (sparsecomm.integrations.hf.SparseCommTrainer).

    torchrun --nproc_per_node 2 examples/hf_trainer_wordnet.py            # CPU: Gloo; add --steps, --density

The mask is scored on the training data before the first step; the head (``classifier.*``) is
kept whole. Rank 0 prints the bytes sent per masked step (4k: k fp32 values) and the wall time.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, TrainingArguments
from wordnet_common import parse_args, report

from sparsecomm.app.tasks import wordnet
from sparsecomm.integrations.hf import SparseCommTrainer


class Encoded(Dataset):
    """Tokenised "lemma: gloss" texts as the Trainer takes them: dicts with ``labels``."""

    def __init__(self, encodings: dict, labels: list[int]):
        self.encodings, self.labels = encodings, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {**{k: v[i] for k, v in self.encodings.items()}, "labels": self.labels[i]}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    texts, labels = wordnet.read_data_noun(wordnet.find_data_noun(args.data_dir))
    train_idx, _ = wordnet.split(len(labels), args.train_size, args.test_size, seed=0)
    model_dir, _ = wordnet.local_model(None, "wordnet")  # the packaged MiniLM folder, offline
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    train = Encoded(tokenizer([texts[i] for i in train_idx], truncation=True, max_length=64),
                    [labels[i] for i in train_idx])
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, local_files_only=True,
                                                               num_labels=len(wordnet.SUPERSENSES))
    training = TrainingArguments(
        "runs/hf_trainer_wordnet", max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, use_cpu=not torch.cuda.is_available(), ddp_find_unused_parameters=False,
        report_to="none", save_strategy="no", logging_steps=max(args.steps // 4, 1), disable_tqdm=True, seed=0)
    trainer = SparseCommTrainer(model=model, args=training, train_dataset=train,
                                data_collator=DataCollatorWithPadding(tokenizer), density=args.density,
                                mask_samples=args.mask_samples, always=["classifier.*"])
    # The classifier's loss is a mean: without this the Trainer multiplies it (and its gradient) by the
    # world size and the accumulation steps, as it does under stock DDP (docs/integrations.md)
    trainer.model_accepts_loss_kwargs = False
    trainer.train()
    report("transformers.Trainer", trainer.mask, trainer.comm_state)


if __name__ == "__main__":
    main()
