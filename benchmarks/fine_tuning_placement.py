"""Where the fine-tuning masks put their 0.5% in MiniLM: do they remove FISH's measured causes?

    python -m benchmarks.fine_tuning_placement --num-samples 256 --out benchmarks/results

One process, the WordNet task as ``transfer_placement.py`` builds it (seed 0, 4,000 training
synsets), the Fisher scores of the first ``--num-samples`` training examples once, then the
masks at 0.5% with the head kept whole: plain FISH; FISH with each normalisation of
:mod:`sparsecomm.score_scaling` (``mask=fisher_scaled``); ``mask=token_rows`` (its embedding
rows from the training set's token counts, the rest Fisher with rows and columns flattened);
and random.
Writes ``fine_tuning_placement.{md,json}``: per mask, the share of k on the word embeddings, the
embedding rows it touches and how many of them are tokens training reads, and the share of its
residual-stream entries on its top 8 of 384 channels (2.1% is a uniform spread).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch



def main(argv=None) -> dict:
    import sparsecomm
    from sparsecomm.app.data import ShardedData
    from sparsecomm.fisher import fisher_scores
    from sparsecomm.mask import Mask, count_for_density, topk_mask
    from sparsecomm.score_scaling import input_activation_scales, normalise_scores
    from sparsecomm.token_rows import count_tokens, embedding_budget, token_row_positions
    from sparsecomm.topk import positions_to_bits
    from transfer_placement import channel_counts
    from tta_worker import build_task

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--density", type=float, default=0.005)
    p.add_argument("--train-size", type=int, default=4000)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    task = build_task({"task": "wordnet", "task_kwargs": {"train_size": a.train_size, "test_size": 8}}, 0)
    model = task.model
    data = ShardedData(task, 0, 1, batch_size=16, eval_batch_size=16, seed=0, device=torch.device("cpu"))
    params = dict(model.named_parameters())
    n = sum(q.numel() for q in params.values())
    k = count_for_density(a.density, n)
    t = time.perf_counter()
    scores, seen = fisher_scores(model, data.fisher_batches(0, 64), task.loss_fn, num_samples=a.num_samples)
    fisher_s = time.perf_counter() - t
    scales = input_activation_scales(model, data.fisher_batches(0, 64), num_samples=a.num_samples)

    def normalised(how: str) -> dict:
        out = {name: s.clone() for name, s in scores.items()}
        normalise_scores(out, model, how, activation_scales=scales)
        return out

    we = next(nm for nm in params if "word_embeddings" in nm)
    vocab, dim = params[we].shape
    counts = count_tokens(task.train_set.ids, vocab)
    budget = embedding_budget(counts, dim, a.density)
    masks = {"FISH": topk_mask(scores, k, task.head)}
    for how in ("activation", "columns", "rows_and_columns"):
        masks[f"fisher_scaled {how}"] = topk_mask(normalised(how), k, task.head)
    rest = normalised("rows_and_columns")  # mask=token_rows mask.normalise=rows_and_columns
    rest[we].zero_()
    rest_mask = topk_mask(rest, k - budget, task.head)
    (rows,) = positions_to_bits(token_row_positions(counts, dim, budget, seed=0, power=0.5), [params[we].shape])
    masks["token_rows"] = Mask({nm: (b | rows if nm == we else b) for nm, b in rest_mask.items()})
    masks["random"] = sparsecomm.random_mask(model, density=a.density, seed=0, always=task.head)

    train_tokens = counts > 0
    res = {"command": "python -m benchmarks.fine_tuning_placement " + " ".join(argv or sys.argv[1:]),
           "num_samples": seen, "k": k, "numel": n, "fisher_s": fisher_s, "train_tokens": int(train_tokens.sum()),
           "masks": {}}
    for kind, mask in masks.items():
        c = channel_counts(mask, params, dim)
        top = torch.topk(c, 8)
        touched = mask[we].any(dim=1)
        res["masks"][kind] = {"k": mask.num_selected, "embedding_share": int(mask[we].sum()) / mask.num_selected,
                              "rows_touched": int(touched.sum()), "rows_in_train": int((touched & train_tokens).sum()),
                              "top8_share": float(top.values.sum() / c.sum())}
    lines = ["| mask | k | share of k on word embeddings | embedding rows touched | of them, tokens training reads "
             "| stream entries on its top 8 of 384 channels |", "|---|---|---|---|---|---|"]
    for kind, m in res["masks"].items():
        lines.append(f"| {kind} | {m['k']:,} | {m['embedding_share']:.1%} | {m['rows_touched']:,} | "
                     f"{m['rows_in_train']:,} | {m['top8_share']:.1%} |")
    text = (f"# Where the fine-tuning masks sit in MiniLM (0.5%)\n\nCommand: `{res['command']}`  \n"
            f"Fisher over {seen} training examples (one process, {fisher_s:.0f} s), k = {k:,} of {n:,} entries, "
            f"head kept whole; the {a.train_size:,} training synsets hold {res['train_tokens']:,} distinct tokens; "
            f"a uniform spread puts 2.1% of the stream entries on any 8 channels.\n\n" + "\n".join(lines) + "\n")
    os.makedirs(a.out, exist_ok=True)
    for ext, body in (("json", json.dumps(res, indent=1)), ("md", text)):
        with open(os.path.join(a.out, f"fine_tuning_placement.{ext}"), "w") as f:
            f.write(body)
    print(text)
    return res


if __name__ == "__main__":
    main()
