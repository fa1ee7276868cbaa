"""The exact candidate exchange of Fisher scores (``sparsecomm.topk.sum_topk``, issue 11).

Every test compares the positions, or the whole mask, with an independent reference: all the
scores summed by ONE float64 all-reduce of the concatenation (what ``exchange="full"`` computes),
then the first k in (value desc, position asc) order by a plain Python sort. Built cases make
the certificate fail once (the second round proves it), or every time (the full exchange
runs), and ties sit at the k-th place.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

import sparsecomm
from multirank import run_ranks
from test_topk_stream import Dead  # a CNN whose dead branch scores exactly 0 (ties)
from sparsecomm.topk import sum_topk


def reference_positions(tensors, k):
    flat = torch.cat([t.reshape(-1).double() for t in tensors])
    dist.all_reduce(flat)
    order = sorted(range(flat.numel()), key=lambda i: (-flat[i].item(), i))
    return sorted(order[:k])


class Spy:
    """Counts the payload bytes this rank hands to all_reduce and all_gather."""

    def __init__(self):
        self.reduced = self.gathered = 0
        self.chunks = []

    def __enter__(self):
        self.real = dist.all_reduce, dist.all_gather

        def all_reduce(t, *a, **kw):
            self.reduced += t.numel() * t.element_size()
            self.chunks.append(t.numel())
            return self.real[0](t, *a, **kw)

        def all_gather(out, t, *a, **kw):
            self.gathered += t.numel() * t.element_size()
            return self.real[1](out, t, *a, **kw)

        dist.all_reduce, dist.all_gather = all_reduce, all_gather
        return self

    def __exit__(self, *exc):
        dist.all_reduce, dist.all_gather = self.real


def heavy_tailed(rank, world, k, chunk):
    g = torch.Generator().manual_seed(100 + rank)
    shared = torch.Generator().manual_seed(7)  # a common signal, as Fisher scores of one model have
    tensors = []
    for shape in [(40, 50), (3000,), (7, 11, 13)]:
        common = torch.empty(shape).exponential_(generator=shared) ** 3
        tensors.append((common * torch.rand(shape, generator=g) * 2).float())
    stats = {}
    with Spy() as spy:
        got = sum_topk(tensors, k, chunk_numel=chunk, stats=stats)
    ref = reference_positions(tensors, k)
    return got.tolist(), ref, stats, spy.reduced, spy.gathered, max(spy.chunks)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("k, chunk", [(30, 1 << 20), (120, 64)])
def test_candidates_equal_the_full_allreduce_on_heavy_tailed_scores(world, k, chunk):
    results = run_ranks(heavy_tailed, world, k, chunk)
    n = 40 * 50 + 3000 + 7 * 11 * 13
    for got, ref, stats, reduced, gathered, biggest in results:
        assert got == ref
        assert got == results[0][0]
        assert stats["exchange"] == "candidates" and stats["rounds"] == 1
        # the bytes it hands to the collectives: W x 2k positions gathered (int32), the union's sums
        assert gathered == 2 * k * 4
        assert reduced == (stats["candidates"] + 1) * 8 <= (world * 2 * k + 1) * 8
        assert reduced + gathered < n * 8 / 5  # against the full exchange's n x 8
        assert biggest <= chunk
        # the formula it reports: ring all-gather + ring all-reduce
        assert stats["bytes_sent"] == (world - 1) * 2 * k * 4 + (2 * (world - 1) * reduced) // world


def spikes_and_plateau(rank, world, plateau_slope, k):
    """Each rank has 20 spikes of 10 at its own positions; a plateau at 3900..3999 is high on every
    rank, so its sums beat every spike's, but no rank's local top 20 holds any of it (4000
    entries: a second round then costs under a quarter of the full exchange on 4 ranks too)."""
    v = torch.zeros(4000)
    v[rank * 20:(rank + 1) * 20] = 10.0
    v[3900:4000] = 9.0 - plateau_slope * torch.arange(100)
    stats = {}
    got = sum_topk([v[:500], v[500:]], k, first_m=20, stats=stats)
    return got.tolist(), reference_positions([v], k), stats


@pytest.mark.parametrize("world", [2, 4])
def test_certificate_fails_then_a_larger_round_proves_it(world):
    # round 1: candidates are spikes (sum 10) and the bound is 10 W: fails; round 2 (m = 80): the
    # plateau's top (sum ~ 9 W) beats the bound 8.41 W
    for got, ref, stats in run_ranks(spikes_and_plateau, world, 0.01, 10):
        assert got == ref == list(range(3900, 3910))
        assert stats["exchange"] == "candidates" and stats["rounds"] == 2


@pytest.mark.parametrize("world", [2, 4])
def test_certificate_never_holds_and_the_full_exchange_gives_the_same_mask(world):
    # a flat plateau: the k-th sum equals the bound in every round (ties at the k-th place,
    # broken by position); the full exchange runs
    for got, ref, stats in run_ranks(spikes_and_plateau, world, 0.0, 10):
        assert got == ref == list(range(3900, 3910))
        assert stats["exchange"] == "full" and stats["rounds"] == 2
        assert stats["bytes_sent"] > stats["full_bytes"]


def integer_ties(rank, world, k):
    g = torch.Generator().manual_seed(rank)
    tensors = [torch.randint(0, 6, (300,), generator=g).float(), torch.randint(0, 4, (20, 20), generator=g).float()]
    stats = {}
    got = sum_topk(tensors, k, stats=stats)
    return got.tolist(), reference_positions(tensors, k), stats["exchange"]


@pytest.mark.parametrize("world", [2, 4])
def test_many_exact_ties_at_the_kth_place(world):
    # integer scores (sums exact in any order): hundreds of entries share the k-th value
    for got, ref, _ in run_ranks(integer_ties, world, 37):
        assert got == ref


def nan_on_one_rank(rank, world):
    v = torch.rand(500)
    if rank == world - 1:
        v[123] = float("nan")
    try:
        sum_topk([v], 10)
    except ValueError as e:
        return str(e)
    return "no error"


def test_nan_on_one_rank_raises_on_every_rank_instead_of_hanging():
    for message in run_ranks(nan_on_one_rank, 2, timeout=60):
        assert "NaN" in message


def fisher_both_exchanges(rank, world, density, always):
    torch.manual_seed(0)
    m = Dead()
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(24, 1, 8, 8, generator=g), torch.randint(0, 3, (24,), generator=g)
    batches = [(x[:12], y[:12]), (x[12:], y[12:])]
    out = {}
    for exchange in ("candidates", "full"):
        stats = {}
        mask = sparsecomm.fisher_mask(m, batches, nn.functional.cross_entropy, density=density,
                                      num_samples=24 * world, always=always, exchange=exchange, stats=stats)
        out[exchange] = (torch.cat([mask[n].reshape(-1) for n, _ in m.named_parameters()]), mask.digest(), stats)
    return out


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("density, always, path", [
    (0.005, (), "candidates"),
    (0.005, ("fc.bias",), "candidates"),
    (0.03, ("fc.*",), "full"),  # fc kept whole: fewer non-zero ranked scores than k, the k-th is a 0-tie
    (0.1, ("fc.*",), "full"),  # a round of candidates would cost over a quarter of the full exchange
])
def test_fisher_mask_candidates_equals_full_exchange_bit_for_bit(world, density, always, path):
    results = run_ranks(fisher_both_exchanges, world, density, always)
    for r in results:
        assert torch.equal(r["candidates"][0], r["full"][0])
        assert r["candidates"][1] == r["full"][1] == results[0]["candidates"][1]
        assert r["candidates"][2]["exchange"] == path
        if path == "candidates":
            assert r["candidates"][2]["bytes_sent"] < r["candidates"][2]["full_bytes"] / 3
        assert r["full"][2] == {}  # the full path does not go through sum_topk


def test_bad_exchange_is_one_line():
    with pytest.raises(ValueError, match="exchange='fast' is not a score exchange; use one of"):
        sparsecomm.fisher_mask(nn.Linear(3, 2), [], nn.functional.cross_entropy, density=0.5, exchange="fast")


def memory_of_the_exchange(rank, world, n, k, chunk):
    from test_topk_stream import allocations

    g, shared = torch.Generator().manual_seed(rank), torch.Generator().manual_seed(7)
    common = torch.empty(n).exponential_(generator=shared) ** 3  # the signal the ranks' scores share
    scores = common * torch.rand(n, generator=g)
    tensors = [scores[:n // 2].clone(), scores[n // 2:].clone()]
    del common, scores
    stats = {}
    seen = allocations(lambda: sum_topk(tensors, k, chunk_numel=chunk, stats=stats))
    return seen, stats


def test_the_exchange_never_allocates_n_float64():
    n, k, chunk = 200_000, 500, 16384  # n x 8 = 1.6 MB
    for seen, stats in run_ranks(memory_of_the_exchange, 2, n, k, chunk):
        assert stats["exchange"] == "candidates"
        m = 2 * k
        assert seen[torch.float64] <= 8 * max(chunk, 4 * 2 * m) < n * 8 / 10, seen  # a chunk, or O(W m)
        assert seen[torch.int64] <= 8 * max(chunk, 4 * 2 * m), seen
