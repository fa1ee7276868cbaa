"""Embedding rows chosen from the training data's own token statistics.

A word embedding's gradient touches only the rows of the tokens in the batch, so a score taken
on a small sample (the Fisher mask's 256 examples) is zero on every row the sample lacks, and a
uniformly random mask spends most of the embedding's share on tokens training never reads
(``benchmarks/results/transfer_mask_placement.md``: FISH selects 331 rows, random 25,153, while
training reads 11,046 distinct tokens). Here the rows come from token counts over the whole
training set: only tokens that occur get entries, frequent tokens more of them.

* :func:`count_tokens`: occurrences of each token id over batches of ids.
* :func:`embedding_budget`: the entries the embedding gets at the model's density, counting
  only the rows of tokens that occur (``density x occurring rows x dim``).
* :func:`token_row_positions`: which entries: every entry of row ``t`` draws ``u`` uniform in
  (0, 1] from a generator seeded by ``seed`` and scores ``count_t^power x u``; the top ``budget``
  are kept (ties by position). Rows of tokens that never occur score 0 and are never kept while
  an occurring row has room. With ``power=0`` the occurring rows are equally likely.

Nothing crosses the network: counts are of the training set every rank holds whole (the app's
tasks) and the draws depend on the seed alone, so every rank computes the same positions.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from .topk import DEFAULT_CHUNK_NUMEL, stream_topk


def count_tokens(batches: Iterable[torch.Tensor], vocab_size: int, *, ignore: Iterable[int] = ()) -> torch.Tensor:
    """int64 ``(vocab_size,)`` occurrences of each id in ``batches`` (int tensors of any shape);
    ids in ``ignore`` (e.g. the padding id) count 0. An id outside ``[0, vocab_size)`` raises."""
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for ids in batches:
        flat = torch.as_tensor(ids).reshape(-1).to(torch.int64).cpu()
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= vocab_size):
            raise ValueError(f"token id {int(flat.max()) if int(flat.max()) >= vocab_size else int(flat.min())} "
                             f"is outside the embedding's {vocab_size} rows: the tokenizer does not match the model")
        counts += torch.bincount(flat, minlength=vocab_size)
    for i in ignore:
        if 0 <= int(i) < vocab_size:
            counts[int(i)] = 0
    return counts


def embedding_budget(counts: torch.Tensor, dim: int, density: float) -> int:
    """``round(density x occurring rows x dim)``, at least 1 when any token occurs."""
    rows = int((counts > 0).sum())
    if rows == 0:
        return 0
    return max(1, min(rows * dim, int(round(density * rows * dim))))


def token_row_positions(counts: torch.Tensor, dim: int, budget: int, *, seed: int, power: float = 0.5,
                        chunk_numel: int = DEFAULT_CHUNK_NUMEL) -> torch.Tensor:
    """Flat positions (int64, ascending) of ``budget`` entries of a ``(len(counts), dim)``
    embedding: the top ``budget`` of ``count_row^power x u`` (module doc). Streams the scores in
    chunks of ``chunk_numel`` float64 entries; O(budget) beyond that."""
    if power < 0:
        raise ValueError(f"power={power} must be >= 0 (0: every occurring token alike)")
    occurring = int((counts > 0).sum())
    if budget > occurring * dim:
        raise ValueError(f"budget={budget} exceeds the {occurring * dim} entries of the {occurring} occurring rows")
    weight = torch.where(counts > 0, counts.to(torch.float64).pow(power), torch.zeros((), dtype=torch.float64))
    gen = torch.Generator().manual_seed(int(seed))
    vocab = counts.numel()

    def write(out: torch.Tensor, lo: int) -> None:
        out.uniform_(0.0, 1.0, generator=gen)
        out.sub_(1.0).neg_()  # (0, 1]: a drawn 0 would tie with never-occurring rows
        rows = torch.arange(lo, lo + out.numel()) // dim
        out.mul_(weight[rows])

    return stream_topk([(vocab * dim, write)], budget, chunk_numel=chunk_numel)
