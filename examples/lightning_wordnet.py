"""Fine-tune the packaged all-MiniLM-L6-v2 on WordNet noun supersenses with PyTorch Lightning, training
and sending only a FISH mask's k entries (sparsecomm.integrations.lightning.SparseCommStrategy).

    torchrun --nproc_per_node 2 examples/lightning_wordnet.py             # CPU: Gloo; add --steps, --density

The strategy scores each rank's shard once the process group is up, sums the scores into one
mask (the head ``net.classifier.*`` kept whole) and registers the masked all-reduce hook;
``configure_optimizers`` returns the MaskedAdamW over that mask. Rank 0 prints the bytes per
masked step (4k) and the wall time.
"""
from __future__ import annotations

import os

import lightning.pytorch as pl
import torch
from wordnet_common import own_shard, parse_args, report, wordnet_task

from sparsecomm.fisher import fisher_mask
from sparsecomm.integrations.lightning import SparseCommStrategy, masked_optimizer


class Supersenses(pl.LightningModule):
    """The task's model as ``net``; one step = the task's loss on a padded batch."""

    def __init__(self, task, lr: float):
        super().__init__()
        self.net, self.loss_fn, self.lr = task.model, task.loss_fn, lr
        self.last_loss = None

    def forward(self, **inputs):  # keyword inputs, as the Fisher scoring calls a model
        return self.net(**inputs)

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        loss = self.loss_fn(self(**inputs), targets)
        self.last_loss = loss.detach().item()
        return loss

    def configure_optimizers(self):
        return masked_optimizer(self, lr=self.lr)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    task = wordnet_task(args)
    module = Supersenses(task, args.lr)

    def fish(lightning_module):  # on every rank, once the process group is up
        shard = own_shard(task.train_set, args.mask_samples, args.batch_size, task.collate_fn)
        return fisher_mask(lightning_module, shard, task.loss_fn, density=args.density,
                           num_samples=args.mask_samples, always=[f"net.{p}" for p in task.head])

    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    strategy = SparseCommStrategy(fish, process_group_backend="gloo" if not torch.cuda.is_available() else None)
    trainer = pl.Trainer(accelerator="auto", devices=local, num_nodes=int(os.environ.get("WORLD_SIZE", 1)) // local,
                         strategy=strategy, max_steps=args.steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    loader = torch.utils.data.DataLoader(task.train_set, batch_size=args.batch_size, shuffle=True,
                                         collate_fn=task.collate_fn)
    trainer.fit(module, loader)
    report("lightning", strategy.mask, strategy.comm_state, module.last_loss)


if __name__ == "__main__":
    main()
