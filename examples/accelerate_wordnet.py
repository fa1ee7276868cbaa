"""Fine-tune the packaged all-MiniLM-L6-v2 on WordNet noun supersenses with Accelerate, training and
sending only a FISH mask's k entries (sparsecomm.integrations.accelerate.prepare_masked).

    torchrun --nproc_per_node 2 examples/accelerate_wordnet.py            # CPU: Gloo; add --steps, --density

After ``accelerator.prepare``, each rank scores its own shard, the ranks sum the scores into one
mask (the head ``classifier.*`` kept whole), and ``prepare_masked`` registers the hook and swaps
the AdamW for its masked counterpart. Rank 0 prints the bytes per masked step (4k) and the wall time.
"""
from __future__ import annotations

import torch
from accelerate import Accelerator
from wordnet_common import own_shard, parse_args, report, wordnet_task

from sparsecomm.fisher import fisher_mask
from sparsecomm.integrations.accelerate import prepare_masked


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    task = wordnet_task(args)
    loader = torch.utils.data.DataLoader(task.train_set, batch_size=args.batch_size, shuffle=True,
                                         collate_fn=task.collate_fn)
    model, loader = accelerator.prepare(task.model, loader)
    mask = fisher_mask(model, own_shard(task.train_set, args.mask_samples, args.batch_size, task.collate_fn),
                       task.loss_fn, density=args.density, num_samples=args.mask_samples, always=task.head)
    optimizer, comm = prepare_masked(accelerator, model, torch.optim.AdamW(model.parameters(), lr=args.lr), mask)
    step, loss = 0, None
    while step < args.steps:
        for inputs, targets in loader:
            loss = task.loss_fn(model(**inputs), targets)
            accelerator.backward(loss)  # the hook all-reduces the k masked values
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step == args.steps:
                break
    report("accelerate", mask, comm, loss.detach().item())


if __name__ == "__main__":
    main()
