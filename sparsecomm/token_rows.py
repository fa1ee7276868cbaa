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
* :func:`token_row_positions`: which entries: the budget is shared among the occurring rows in
  proportion to ``w_t = count_t^power`` by the D'Hondt rule (row ``t``'s ``r``-th entry scores
  ``w_t / (r + 1)``, the top ``budget`` scores win, ties by position): with ``power`` below 1 the
  budget reaches most occurring rows (a frequent token gets more entries, not all of them);
  within a row the entries come in a random order drawn from ``seed``. Rows of tokens that never occur get none. ``power=0``: every occurring row alike.

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
    embedding (module doc: D'Hondt shares of ``count^power`` over the occurring rows).

    The random order: ``torch.rand(occurring rows, dim)`` (float32, a CPU generator seeded with
    ``seed``, rows in id order) argsorted per row; the entry at column ``c`` of row ``t`` is
    that row's ``r``-th, ``r`` = the rank of its draw. Memory: the ranks (4 bytes per entry of an
    occurring row, 12 transiently), one float64 chunk of ``chunk_numel`` entries and O(budget).
    """
    if power < 0:
        raise ValueError(f"power={power} must be >= 0 (0: every occurring token alike)")
    occurring = (counts > 0).nonzero().reshape(-1)
    if budget > occurring.numel() * dim:
        raise ValueError(f"budget={budget} exceeds the {occurring.numel() * dim} entries of the "
                         f"{occurring.numel()} occurring rows")
    gen = torch.Generator().manual_seed(int(seed))
    ranks = torch.rand(occurring.numel(), dim, generator=gen).argsort(1).argsort(1).to(torch.int32)
    row_of = torch.full((counts.numel(),), -1, dtype=torch.int64)
    row_of[occurring] = torch.arange(occurring.numel())
    weight = counts.to(torch.float64).pow(power)

    def write(out: torch.Tensor, lo: int) -> None:
        pos = torch.arange(lo, lo + out.numel())
        rows, cols = pos // dim, pos % dim
        r = row_of[rows]
        has = r >= 0
        out.zero_()
        out[has] = weight[rows[has]] / (ranks[r[has], cols[has]].to(torch.float64) + 1.0)

    return stream_topk([(counts.numel() * dim, write)], budget, chunk_numel=chunk_numel)
