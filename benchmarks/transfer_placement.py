"""Where FISH 0.5% and random 0.5% put their entries in MiniLM (issue 11's "find out why").

    python -m benchmarks.transfer_placement --num-samples 256 --more-samples 1024 --head-steps 25 --out benchmarks/results

One process: the WordNet task as ``transfer.py`` builds it (seed 0, 4,000 training synsets), the
Fisher scores of the first ``--num-samples`` training examples (``ShardedData.fisher_batches``
of a world of 1, batches of 64; the benchmark's FISH masks sum two ranks' shards: the same
estimator, other examples), and the masks at 0.5% with the head kept whole: FISH through the
fresh head (what ``fish-0.5`` trains), FISH through a head trained alone for ``--head-steps``
steps of 32 examples at lr 1e-3 (what ``fishhead-0.5`` trains), optionally FISH over
``--more-samples`` examples, and the random mask of seed 0.
Writes ``transfer_mask_placement.{md,json}``: per group of parameters, its entries, the share of
the k selected entries each mask puts there and the density inside the group; the overlap of
the two FISH masks; and how the entries spread over the 384 channels of the residual stream
(each weight's side that reads or writes it: a few "outlier" channels holding most of a mask
means the mask trains few directions, however many entries it has).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from itertools import islice

import torch

import sparsecomm
from sparsecomm.app.data import ShardedData
from sparsecomm.app.engine import StepEngine
from sparsecomm.app.tasks import wordnet
from sparsecomm.fisher import fisher_scores
from sparsecomm.mask import count_for_density, matches_any, topk_mask


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


def residual_axis(name: str, shape: torch.Size, hidden: int) -> int | None:
    """The axis of ``name`` that indexes the residual stream's ``hidden`` channels, else None."""
    if re.search(r"attention\.self\.(query|key|value)\.weight|intermediate\.dense\.weight|embeddings\.\w+\.weight$",
                 name) and "LayerNorm" not in name:
        return 1  # reads the stream: [out, in = hidden] (embeddings: [rows, hidden])
    if re.search(r"output\.dense\.(weight|bias)$|LayerNorm\.(weight|bias)$", name):
        return 0  # writes the stream (or normalises it): [hidden, ...]
    return None


def channel_counts(mask, params: dict, hidden: int) -> torch.Tensor:
    """Selected entries per residual channel (int64 [hidden]) over every parameter that reads/writes it."""
    counts = torch.zeros(hidden, dtype=torch.int64)
    for name, p in params.items():
        axis = residual_axis(name, p.shape, hidden)
        if axis is None or p.shape[axis] != hidden:
            continue
        bits = mask[name].to(torch.int64)
        counts += bits.sum(dim=1) if axis == 0 and bits.dim() == 2 else bits.sum(dim=0) if axis == 1 else bits
    return counts


def train_head(task, model, steps: int, lr: float, seed: int) -> None:
    """The head alone, ``steps`` AdamW steps of 32 training examples (the encoder frozen, eval mode off),
    through the app's step; the encoder's gradients are dropped before the update."""
    head = [p for n, p in model.named_parameters() if matches_any(n, task.head)]
    body = [p for n, p in model.named_parameters() if not matches_any(n, task.head)]
    opt = torch.optim.AdamW(head, lr=lr, weight_decay=0.0)
    data = ShardedData(task, 0, 1, batch_size=32, eval_batch_size=32, seed=seed, device=torch.device("cpu"))
    engine = StepEngine(task.loss_fn)
    model.train()

    def drop_encoder_grads():
        for p in body:
            p.grad = None

    for _ in range(steps):
        engine.step(model, data.next_batch(), opt, after_backward=drop_encoder_grads)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--density", type=float, default=0.005)
    p.add_argument("--train-size", type=int, default=4000)
    p.add_argument("--more-samples", type=int, default=0, help="also FISH over this many examples (0: skip)")
    p.add_argument("--head-steps", type=int, default=25, help="steps training the head alone (0: skip that mask)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    task = wordnet.build(train_size=a.train_size, test_size=8)
    model = task.model
    data = ShardedData(task, 0, 1, batch_size=16, eval_batch_size=16, seed=0, device=torch.device("cpu"))
    params = dict(model.named_parameters())
    n = sum(p.numel() for p in params.values())
    k = count_for_density(a.density, n)

    def fish(num_samples: int) -> tuple:
        t = time.perf_counter()
        scores, seen = fisher_scores(model, data.fisher_batches(0, 64), task.loss_fn, num_samples=num_samples)
        return topk_mask(scores, k, task.head), seen, time.perf_counter() - t

    masks = {}
    masks["FISH"], seen, fisher_s = fish(a.num_samples)
    if a.more_samples:
        masks[f"FISH, {a.more_samples} examples"] = fish(a.more_samples)[0]
    masks["random"] = sparsecomm.random_mask(model, density=a.density, seed=0, always=task.head)
    if a.head_steps:
        train_head(task, model, a.head_steps, 1e-3, seed=0)
        masks["FISH, head first"] = fish(a.num_samples)[0]
    kinds = list(masks)
    rows = {}
    for name, prm in params.items():
        g = rows.setdefault(group_of(name), {"entries": 0, **{kind: 0 for kind in kinds}})
        g["entries"] += prm.numel()
        for kind, mask in masks.items():
            g[kind] += int(mask[name].sum())
    lines = ["| parameter group | entries (% of model) | " + " | ".join(f"{kd} 0.5%: share of k | density inside"
                                                             for kd in kinds) + " |",
             "|---|---|" + "---|---|" * len(kinds)]
    for label, g in sorted(rows.items(), key=lambda kv: -kv[1]["entries"]):
        lines.append(f"| {label} | {g['entries']:,} ({g['entries'] / n:.1%}) | " + " | ".join(
            f"{g[kd] / k:.1%} | {g[kd] / g['entries']:.2%}" for kd in kinds) + " |")
    # how many distinct rows of the word embedding each mask touches, and how many of those rows are
    # tokens that training reads: an embedding row has a gradient only in examples holding its token,
    # so FISH can pick only rows of tokens in its Fisher sample
    we = next(nm for nm in params if "word_embeddings" in nm)
    touched = {kind: int(mask[we].any(dim=1).sum()) for kind, mask in masks.items()}
    train_tokens = torch.unique(torch.cat(task.train_set.ids).long())
    sample = [row for x, _ in islice(data.fisher_batches(0, 64), -(-seen // 64)) for row in x["input_ids"]]
    sample_tokens = torch.unique(torch.cat(sample[:seen]))
    rows_in_train = {kind: int(mask[we][train_tokens].any(dim=1).sum()) for kind, mask in masks.items()}
    tokens = {"train": int(train_tokens.numel()), "fisher_sample": int(sample_tokens.numel()),
              "rows_in_train": rows_in_train}
    # the residual stream's channels: the share of each mask's stream-touching entries in its top 8 channels
    hidden = params[we].shape[1]
    channels = {}
    for kind, mask in masks.items():
        c = channel_counts(mask, params, hidden)
        top = torch.topk(c, 8)
        channels[kind] = {"entries": int(c.sum()), "top8_share": float(top.values.sum() / c.sum()),
                          "top8_channels": top.indices.tolist()}
    overlap = None
    if "FISH, head first" in masks:
        a_, b_ = masks["FISH"], masks["FISH, head first"]
        both = sum(int((a_[nm] & b_[nm]).sum()) for nm in params)
        overlap = {"shared_entries": both, "share_of_k": both / k}
    res = {"command": "python -m benchmarks.transfer_placement " + " ".join(argv or sys.argv[1:]),
           "num_samples": seen, "k": k, "numel": n, "fisher_s": fisher_s, "head_steps": a.head_steps,
           "groups": rows, "word_embedding_rows_touched": touched, "tokens": tokens, "residual_channels": channels,
           "fish_overlap": overlap}
    chan_lines = ["| mask | entries on stream channels | share in its top 8 of 384 channels | those channels |",
                  "|---|---|---|---|"] + [f"| {kd} | {c['entries']:,} | {c['top8_share']:.1%} | "
                                          f"{', '.join(map(str, sorted(c['top8_channels'])))} |"
                                          for kd, c in channels.items()]
    text = (f"# Where the 0.5% masks sit in MiniLM\n\nCommand: `{res['command']}`  \n"
            f"Fisher over {seen} training examples (one process, {fisher_s:.0f} s), k = {k:,} of {n:,} entries "
            f"(head kept whole in every mask). \"FISH, head first\": scored after {a.head_steps} steps "
            f"training the head alone (32 examples a step, lr 1e-3).\n\n" + "\n".join(lines) +
            "\n\nWord-embedding rows (tokens) with at least one selected entry: "
            + ", ".join(f"{kd} {t:,}" for kd, t in touched.items()) + f" (of {params[we].shape[0]:,}); of these, "
            f"rows of tokens the {a.train_size:,} training synsets hold ({tokens['train']:,} distinct tokens): "
            + ", ".join(f"{kd} {t:,}" for kd, t in rows_in_train.items())
            + f". The Fisher sample ({seen} examples; padding included) holds {tokens['fisher_sample']:,} distinct "
            "tokens: no other row has a Fisher score above 0.\n\n"
            + "Residual-stream channels (a uniform spread puts 8/384 = 2.1% in any 8 channels):\n\n"
            + "\n".join(chan_lines) + "\n"
            + (f"\nThe two FISH masks share {overlap['shared_entries']:,} entries ({overlap['share_of_k']:.1%} of k).\n"
               if overlap else ""))
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "transfer_mask_placement.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(a.out, "transfer_mask_placement.md"), "w") as f:
        f.write(text)
    print(text)
    return res


if __name__ == "__main__":
    main()
