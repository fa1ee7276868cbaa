"""The streamed top-k (sparsecomm/topk.py) against the concatenating selection it replaced.

``reference_topk_mask`` and ``reference_random_mask`` below are the previous implementations of
``topk_mask`` / ``random_mask``, written out here as the independent reference: every score
copied to float64 on the CPU, concatenated, ``torch.topk`` for the k-th value, entries above it
plus the first ties by position; parameters matching ``always`` kept whole and counted in k.
The new code must give bit-identical masks on the same scores, and must not allocate anything
of the model's size in float64.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import sparsecomm
from multirank import run_ranks
from sparsecomm.fisher import fisher_scores
from sparsecomm.mask import Mask, matches_any, topk_mask
from sparsecomm.topk import StreamingTopK


# ---- the reference: the concatenating selection, as it was ------------------------------------

def reference_topk_mask(scores, k, always=()):
    names = list(scores)
    kept_whole = [n for n in names if matches_any(n, always)]
    ranked = [n for n in names if n not in kept_whole]
    n_whole = sum(scores[n].numel() for n in kept_whole)
    assert n_whole <= k
    bits = {n: torch.ones(scores[n].shape, dtype=torch.bool) for n in kept_whole}
    k_rest = k - n_whole
    if ranked:
        flat = torch.cat([scores[n].detach().reshape(-1).to(torch.float64).cpu() for n in ranked])
        assert not torch.isnan(flat).any()
        sel = torch.zeros(flat.numel(), dtype=torch.bool)
        if k_rest > 0:
            threshold = torch.topk(flat, k_rest, sorted=True).values[-1]
            sel = flat > threshold
            need = k_rest - int(sel.sum())
            ties = (flat == threshold).nonzero().reshape(-1)[:need]
            sel[ties] = True
        offset = 0
        for n in ranked:
            m = scores[n].numel()
            bits[n] = sel[offset:offset + m].reshape(scores[n].shape)
            offset += m
    return {n: bits[n] for n in names}


def reference_random_mask(model, density, seed, always=()):
    params = dict(model.named_parameters())
    k = round(density * sum(p.numel() for p in params.values()))
    gen = torch.Generator().manual_seed(int(seed))
    scores = {n: torch.rand(p.shape, generator=gen, dtype=torch.float64) for n, p in params.items()}
    return reference_topk_mask(scores, k, always)


def assert_same(mask: Mask, ref: dict):
    assert list(mask) == list(ref)
    for n in ref:
        assert torch.equal(mask[n], ref[n]), n


# ---- models and scores with many ties --------------------------------------------------------

class TinyGPT(nn.Module):
    """GPT-2-shaped: embeddings, LayerNorms, attention and MLP Linears, a head."""

    def __init__(self, vocab=23, d=12, seq=6):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.ln1, self.attn, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln2, self.fc, self.out = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.head = nn.Linear(d, vocab)


def mlp():
    return nn.Sequential(nn.Linear(9, 31), nn.ReLU(), nn.Linear(31, 17), nn.ReLU(), nn.Linear(17, 4))


def cnn():
    return nn.Sequential(nn.Conv2d(2, 5, 3), nn.BatchNorm2d(5), nn.Flatten(), nn.Linear(5 * 4 * 4, 3))


MODELS = {"mlp": mlp, "cnn": cnn, "gpt": TinyGPT}
ALWAYS = {"mlp": ["4.*"], "cnn": ["3.bias", "1.*"], "gpt": ["head.*", "ln*"]}


def tied_scores(model, kind, seed):
    """Scores with many exact ties: small integers, zero blocks, equal halves, an inf."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (n, p) in enumerate(model.named_parameters()):
        if kind == "ints":
            s = torch.randint(0, 4, p.shape, generator=g).float()
        elif kind == "zeros":
            s = torch.zeros(p.shape) if i % 2 else torch.rand(p.shape, generator=g) * (torch.rand(p.shape, generator=g) > 0.7)
        else:  # "mixed": floats with repeats, negatives, -0.0, and an inf
            s = torch.randint(-3, 3, p.shape, generator=g).float() / 2
            s.reshape(-1)[:: 5] = -0.0
            if i == 1:
                s.reshape(-1)[0] = float("inf")
        out[n] = s
    return out


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("kind", ["ints", "zeros", "mixed"])
@pytest.mark.parametrize("chunk", [3, 64, 1000, 1 << 20])
def test_topk_mask_equals_concatenated_topk(model_name, kind, chunk):
    torch.manual_seed(0)
    model = MODELS[model_name]()
    scores = tied_scores(model, kind, seed=len(model_name) + len(kind))
    n = sum(s.numel() for s in scores.values())
    n_always = sum(scores[m].numel() for m in scores if matches_any(m, ALWAYS[model_name]))
    for k in sorted({1, 3, n // 50 + 1, n // 7, n // 2, n - 1, n}):
        assert_same(topk_mask(scores, k, chunk_numel=chunk), reference_topk_mask(scores, k))
        if k >= n_always:
            got = topk_mask(scores, k, ALWAYS[model_name], chunk_numel=chunk)
            assert_same(got, reference_topk_mask(scores, k, ALWAYS[model_name]))
            assert got.num_selected == k


def test_topk_mask_always_uses_whole_budget_and_nan_raises():
    scores = {"a": torch.ones(4), "head": torch.rand(3)}
    m = topk_mask(scores, 3, ["head"], chunk_numel=2)  # k - #always = 0: nothing ranked is taken
    assert_same(m, reference_topk_mask(scores, 3, ["head"]))
    with pytest.raises(ValueError, match="NaN"):
        topk_mask({"a": torch.tensor([1.0, float("nan")])}, 1, chunk_numel=1)
    with pytest.raises(ValueError, match="NaN"):  # also when the budget is spent on `always`
        topk_mask({"a": torch.tensor([1.0, float("nan")]), "h": torch.ones(1)}, 1, ["h"])


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("chunk", [5, 333, 1 << 22])
def test_random_mask_is_unchanged_for_every_seed(model_name, chunk):
    torch.manual_seed(0)
    model = MODELS[model_name]()
    for seed, density in [(0, 0.01), (1, 0.2), (7, 0.5), (3, 1.0)]:
        got = sparsecomm.random_mask(model, density=density, seed=seed, chunk_numel=chunk)
        assert_same(got, reference_random_mask(model, density, seed))
        got = sparsecomm.random_mask(model, density=0.6, seed=seed, always=ALWAYS[model_name], chunk_numel=chunk)
        assert_same(got, reference_random_mask(model, 0.6, seed, ALWAYS[model_name]))


def test_streaming_topk_merge_is_the_total_order():
    """Direct check of the merge: values sorted by (value desc, position asc), first k."""
    g = torch.Generator().manual_seed(5)
    v = torch.randint(0, 6, (500,), generator=g).double()
    for k in (1, 10, 99, 250, 500):
        order = sorted(range(500), key=lambda i: (-v[i].item(), i))[:k]
        for chunk in (1, 3, 64, 500):
            top = StreamingTopK(k)
            for s in range(0, 500, chunk):
                top.add(v[s:s + chunk].clone(), s)
            assert top.positions.tolist() == sorted(order)
    with pytest.raises(ValueError, match="position order"):
        top = StreamingTopK(2)
        top.add(v[:5], 5)
        top.add(v[:5], 0)


# ---- memory: never an n-sized float64 ---------------------------------------------------------

class NewTensors(TorchDispatchMode):
    """Every tensor an aten op creates (not a view or an in-place result of its inputs): bytes by dtype.

    Deterministic (no RSS, no timing): it sees each allocation the code asks torch for.
    """

    def __init__(self):
        super().__init__()
        self.biggest: dict[torch.dtype, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)]
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                nbytes = t.untyped_storage().nbytes()
                self.biggest[t.dtype] = max(self.biggest.get(t.dtype, 0), nbytes)
        return out


def allocations(fn) -> dict[torch.dtype, int]:
    with NewTensors() as seen:
        fn()
    return seen.biggest


def test_mask_building_never_allocates_n_float64():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 300), nn.Linear(300, 300), nn.Linear(300, 10))
    n = sum(p.numel() for p in model.parameters())  # ~184k entries: n x 8 = 1.4 MB
    largest_param = max(p.numel() for p in model.parameters())
    density, chunk = 0.005, 16384
    k = round(density * n)
    scores = {name: torch.rand(p.shape) for name, p in model.named_parameters()}
    for build in (lambda: sparsecomm.random_mask(model, density=density, seed=0, chunk_numel=chunk),
                  lambda: topk_mask(scores, k, chunk_numel=chunk)):
        seen = allocations(build)
        assert seen[torch.float64] <= 8 * max(chunk, 4 * k), seen  # one chunk, or the candidates
        assert seen[torch.int64] <= 8 * max(chunk, 4 * k), seen
        assert seen[torch.bool] <= largest_param, seen  # the bits, one parameter at a time
    # the check can fail: the concatenating reference allocates n float64 at once
    seen = allocations(lambda: reference_random_mask(model, density, 0))
    assert seen[torch.float64] >= 8 * n


# ---- fisher_mask on 2 ranks against the concatenating all-reduce -------------------------------

class Dead(nn.Module):
    """A CNN with a branch multiplied by zero: its scores are exactly 0, so the top k has ties."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.dead = nn.Linear(4 * 6 * 6, 4 * 6 * 6)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        return self.fc(h + 0.0 * self.dead(h))


def fisher_both_ways(rank, world, density, always, chunk):
    torch.manual_seed(0)
    m = Dead()
    m.conv.bias.requires_grad_(False)  # frozen: not scored, never selected
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(20, 1, 8, 8, generator=g), torch.randint(0, 3, (20,), generator=g)
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    loss = nn.functional.cross_entropy
    sizes = []
    real = dist.all_reduce

    def spy(t, *a, **kw):
        sizes.append((t.numel(), t.dtype))
        return real(t, *a, **kw)

    dist.all_reduce = spy
    try:
        mask = sparsecomm.fisher_mask(m, batches, loss, density=density, num_samples=20 * world, always=always,
                                      score_chunk_numel=chunk)
    finally:
        dist.all_reduce = real
    # the reference: n float64 scores in one all-reduce, then the concatenating top-k
    scores, _ = fisher_scores(m, batches, loss, num_samples=20)
    flat = torch.cat([s.reshape(-1).double() for s in scores.values()])
    dist.all_reduce(flat)
    offset, summed = 0, {}
    for n, s in scores.items():
        summed[n] = flat[offset:offset + s.numel()].reshape(s.shape)
        offset += s.numel()
    k = round(density * sum(p.numel() for p in m.parameters()))
    ref = reference_topk_mask(summed, k, always)
    ref = {n: ref.get(n, torch.zeros(p.shape, dtype=torch.bool)) for n, p in m.named_parameters()}
    zeros = int((flat == 0).sum())
    return {n: mask[n] for n in mask}, ref, sizes, zeros, mask.digest()


@pytest.mark.parametrize("density, always, chunk", [(0.05, (), 100), (0.4, ("fc.*",), 1000), (0.7, (), 1 << 22)])
def test_fisher_mask_two_ranks_equals_one_float64_allreduce(density, always, chunk):
    results = run_ranks(fisher_both_ways, 2, density, always, chunk)
    assert results[0][4] == results[1][4]
    for mask, ref, sizes, zeros, _ in results:
        assert_same(Mask(mask), ref)
        assert zeros > 0  # the dead branch: exact ties at 0
        score_sums = [s for s in sizes if s[1] == torch.float64]
        assert score_sums and all(numel <= chunk for numel, _ in score_sums)
