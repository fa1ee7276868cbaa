"""Where FISH 0.5% and random 0.5% put their entries in MiniLM (issue 11's "find out why").

    python benchmarks/transfer_placement.py --num-samples 256 --out benchmarks/results

One process: the WordNet task as ``transfer.py`` builds it (seed 0, 4,000 training synsets), the
Fisher scores of the first ``--num-samples`` training examples of rank 0's batches of 64 (the
benchmark's FISH masks sum two ranks' shards of 128 each: the same estimator, other examples),
the FISH mask at 0.5% with the head kept whole, and the random mask of seed 0. Writes
``transfer_mask_placement.{md,json}``: per group of parameters, its entries, the share of the k
selected entries each mask puts there, and the density inside the group.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

GROUPS = [  # (label, regex over parameter names), first match wins
    ("head (kept whole)", r"^classifier\."),
    ("word embeddings", r"word_embeddings"),
    ("position + type embeddings", r"(position|token_type)_embeddings"),
    ("LayerNorms", r"LayerNorm"),
    ("attention Q, K, V weights", r"attention\.self\.(query|key|value)\.weight"),
    ("attention output weight", r"attention\.output\.dense\.weight"),
    ("FFN in weight (384 -> 1536)", r"intermediate\.dense\.weight"),
    ("FFN out weight (1536 -> 384)", r"\.output\.dense\.weight"),
    ("biases", r"bias$"),
]


def group_of(name: str) -> str:
    for label, pattern in GROUPS:
        if re.search(pattern, name):
            return label
    return "other"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--density", type=float, default=0.005)
    p.add_argument("--train-size", type=int, default=4000)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    a = p.parse_args(argv)
    import sparsecomm
    from sparsecomm.fisher import fisher_scores
    from sparsecomm.mask import count_for_density, topk_mask
    from tta_worker import batches, build_task

    torch.set_num_threads(1)
    task = build_task({"task": "wordnet", "task_kwargs": {"train_size": a.train_size, "test_size": 8}}, 0)
    model = task.model
    t0 = time.perf_counter()
    scores, seen = fisher_scores(model, batches(task, 0, 1, 64, 7), task.loss_fn, num_samples=a.num_samples)
    fisher_s = time.perf_counter() - t0
    params = dict(model.named_parameters())
    n = sum(p.numel() for p in params.values())
    k = count_for_density(a.density, n)
    masks = {"FISH": topk_mask(scores, k, task.head),
             "random": sparsecomm.random_mask(model, density=a.density, seed=0, always=task.head)}
    rows = {}
    for name, p in params.items():
        g = rows.setdefault(group_of(name), {"entries": 0, "FISH": 0, "random": 0})
        g["entries"] += p.numel()
        for kind, mask in masks.items():
            g[kind] += int(mask[name].sum())
    lines = ["| parameter group | entries (% of model) | FISH 0.5%: share of k | density inside | "
             "random 0.5%: share of k | density inside |", "|---|---|---|---|---|---|"]
    for label, g in sorted(rows.items(), key=lambda kv: -kv[1]["entries"]):
        lines.append(f"| {label} | {g['entries']:,} ({g['entries'] / n:.1%}) | {g['FISH'] / k:.1%} | "
                     f"{g['FISH'] / g['entries']:.2%} | {g['random'] / k:.1%} | {g['random'] / g['entries']:.2%} |")
    # how many distinct rows of the word embedding each mask touches
    we = next(nm for nm in params if "word_embeddings" in nm)
    touched = {kind: int(mask[we].any(dim=1).sum()) for kind, mask in masks.items()}
    res = {"command": "python benchmarks/transfer_placement.py " + " ".join(argv or sys.argv[1:]),
           "num_samples": seen, "k": k, "numel": n, "fisher_s": fisher_s, "groups": rows,
           "word_embedding_rows_touched": touched}
    text = (f"# Where the 0.5% masks sit in MiniLM\n\nCommand: `{res['command']}`  \n"
            f"Fisher over {seen} training examples (one process, {fisher_s:.0f} s), k = {k:,} of {n:,} entries "
            f"(head kept whole in both masks).\n\n" + "\n".join(lines) +
            f"\n\nWord-embedding rows (tokens) with at least one selected entry: FISH {touched['FISH']:,}, "
            f"random {touched['random']:,} (of {params[we].shape[0]:,}).\n")
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "transfer_mask_placement.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(a.out, "transfer_mask_placement.md"), "w") as f:
        f.write(text)
    print(text)
    return res


if __name__ == "__main__":
    main()
