"""The fine-tuning mask criteria of the library against slow references written here:
activation-normalised Fisher (sparsecomm.score_scaling), token-count embedding rows
(sparsecomm.token_rows), the learned mask's local gradients and refresh (sparsecomm.learned_mask)
and lottery-ticket change masks (sparsecomm.change_mask); multi-rank cases on 2 Gloo ranks."""
from collections import Counter

import pytest
import torch
from torch import nn

import sparsecomm
from multirank import run_ranks
from reference import reference_fisher
from sparsecomm.change_mask import change_mask, rewind, snapshot
from sparsecomm.hook import register_masked_allreduce
from sparsecomm.learned_mask import LocalGradientSquares, refresh_mask
from sparsecomm.mask import Mask
from sparsecomm.score_scaling import input_activation_scales, normalise_marginals, normalise_scores
from sparsecomm.token_rows import count_tokens, embedding_budget, token_row_positions


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def mlp():
    torch.manual_seed(0)
    return MLP()


def data(n=24, bs=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g) * torch.tensor([8.0, 1, 1, 0.5, 1, 3])  # outlier channels
    y = torch.randint(0, 3, (n,), generator=g)
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]


def reference_mean_squares(m, batches):
    xs = torch.cat([x for x, _ in batches]).double()
    with torch.no_grad():
        h = torch.relu(m.fc1(xs.float())).double()
    return {"fc1.weight": xs.pow(2).mean(0), "fc2.weight": h.pow(2).mean(0)}


def reference_topk(scores, k, always=()):
    """Bits of the top k of the concatenated scores (value desc, position asc), ``always`` names whole."""
    names = list(scores)
    ranked = [n for n in names if n not in always]
    flat = torch.cat([scores[n].double().reshape(-1) for n in ranked])
    order = sorted(range(flat.numel()), key=lambda i: (-float(flat[i]), i))
    k_ranked = k - sum(scores[n].numel() for n in always)
    bits = torch.zeros(flat.numel(), dtype=torch.bool)
    bits[order[:k_ranked]] = True
    out, lo = {}, 0
    for n in names:
        if n in always:
            out[n] = torch.ones(scores[n].shape, dtype=torch.bool)
        else:
            out[n] = bits[lo:lo + scores[n].numel()].reshape(scores[n].shape)
            lo += scores[n].numel()
    return out


# ---------------------------------------------------------------- activation-normalised Fisher

def test_activation_scales_are_the_mean_squared_inputs_of_each_linear():
    m = mlp()
    got = input_activation_scales(m, data(), num_samples=24)
    want = reference_mean_squares(m, data())
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-9)


def _normalised_mask(rank, world, how):
    m = mlp()
    mine = data()[rank::world]
    scales = input_activation_scales(m, mine, num_samples=12) if how == "activation" else None
    mask = sparsecomm.fisher_mask(
        m, mine, nn.functional.cross_entropy, density=0.2, num_samples=24, always=["fc2.bias"],
        transform=lambda s: normalise_scores(s, m, how, activation_scales=scales))
    return {n: b.clone() for n, b in mask.items()}


def reference_normalised(how):
    m = mlp()
    s = {n: v.double() for n, v in reference_fisher(m, data(), nn.functional.cross_entropy).items()}
    if how == "activation":
        for n, a2 in reference_mean_squares(m, data()).items():
            s[n] = s[n] / a2.reshape(1, -1)
    else:
        for n in ("fc1.weight", "fc2.weight"):
            w = s[n]
            mean, rows, cols = w.mean(), w.mean(1, keepdim=True), w.mean(0, keepdim=True)
            s[n] = w * mean / cols if how == "columns" else w * mean * mean / (rows * cols)
    return s


@pytest.mark.parametrize("how", ["activation", "columns", "rows_and_columns"])
def test_two_ranks_rank_what_one_process_with_all_data_ranks(how):
    """Each rank scores its shard; the mask equals the top-k of the normalised full-data scores."""
    got = run_ranks(_normalised_mask, 2, how)
    assert all(torch.equal(got[0][n], got[1][n]) for n in got[0])
    scores = reference_normalised(how)
    k = round(0.2 * sum(v.numel() for v in scores.values()))
    want = reference_topk(scores, k, always=("fc2.bias",))
    for n in want:
        assert torch.equal(got[0][n], want[n]), n


def test_normalisation_moves_the_budget_off_the_outlier_channel():
    m = mlp()
    plain = sparsecomm.fisher_mask(m, data(), nn.functional.cross_entropy, density=0.2, num_samples=24)
    scales = input_activation_scales(m, data(), num_samples=24)
    scaled = sparsecomm.fisher_mask(m, data(), nn.functional.cross_entropy, density=0.2, num_samples=24,
                                    transform=lambda s: normalise_scores(s, m, "activation", activation_scales=scales))
    # channel 0 carries 8x the activation of the others: plain Fisher favours its column
    assert plain["fc1.weight"][:, 0].sum() > scaled["fc1.weight"][:, 0].sum()


def test_rows_and_columns_flattens_a_product_score():
    u, v = torch.rand(5, 1) + 0.1, torch.rand(1, 7) + 0.1
    scores = {"w": (u * v).float()}
    normalise_marginals(scores, ["w"], rows=True)
    torch.testing.assert_close(scores["w"], torch.full((5, 7), float((u * v).mean())), rtol=1e-5, atol=0)


def test_unknown_normalisation_is_named():
    with pytest.raises(ValueError, match="normalise='both'.*activation"):
        normalise_scores({}, mlp(), "both")


# ---------------------------------------------------------------- token rows

def test_count_tokens_matches_a_counter_and_ignores_padding():
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 12, (3, 5), generator=g) for _ in range(4)]
    want = Counter(int(t) for b in batches for t in b.reshape(-1))
    got = count_tokens(batches, 12, ignore=[0])
    assert got.tolist() == [0] + [want.get(i, 0) for i in range(1, 12)]
    with pytest.raises(ValueError, match="outside the embedding's 12 rows"):
        count_tokens([torch.tensor([12])], 12)


@pytest.mark.parametrize("power", [0.0, 0.5, 1.0])
def test_token_row_positions_share_the_budget_by_dhondt_over_the_rows_the_data_holds(power):
    counts = torch.tensor([0, 5, 0, 1, 40, 2, 0, 9])
    dim, seed = 6, 3
    budget = embedding_budget(counts, dim, 0.5)
    assert budget == round(0.5 * 5 * dim)
    got = token_row_positions(counts, dim, budget, seed=seed, power=power, chunk_numel=7)
    # the reference: hand out the budget one entry at a time to the row with the largest w / (n + 1)
    w = {t: float(c) ** power for t, c in enumerate(counts.tolist()) if c > 0}
    n = dict.fromkeys(w, 0)
    for _ in range(budget):
        t = max((t for t in w if n[t] < dim), key=lambda t: (w[t] / (n[t] + 1), -t))
        n[t] += 1
    occurring = [t for t in w]
    order = torch.rand(len(occurring), dim, generator=torch.Generator().manual_seed(seed)).argsort(1)
    want = sorted(t * dim + int(c) for i, t in enumerate(occurring) for c in order[i, :n[t]])
    assert got.tolist() == want
    rows = set((got // dim).tolist())
    assert rows <= set(w), "only rows of tokens the data holds"
    if power < 1:  # a row's share shrinks with its count's power; here each of 5 rows gets one at least
        assert rows == set(w)
# ---------------------------------------------------------------- the learned mask

def _local_squares(rank, world):
    torch.manual_seed(0)
    model = MLP()
    ref = MLP()
    ref.load_state_dict(model.state_dict())
    ddp = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
    mask = Mask({n: torch.rand(p.shape, generator=torch.Generator().manual_seed(7)) < 0.3
                 for n, p in model.named_parameters()})
    register_masked_allreduce(ddp, mask)
    acc = LocalGradientSquares(ddp).attach()
    want = {n: torch.zeros_like(p) for n, p in ref.named_parameters()}
    for step, (x, y) in enumerate(data(seed=rank)):
        acc.enabled = step != 1  # pass 1 is not counted
        acc.begin_pass()
        ddp.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        ref.zero_grad()
        nn.functional.cross_entropy(ref(x), y).backward()
        if step != 1:
            for n, p in ref.named_parameters():
                want[n] += p.grad ** 2
        outside = {n: p.grad[~mask[n]] for n, p in model.named_parameters()}
        assert all(bool((v == 0).all()) for v in outside.values()), "the hook still zeroes unmasked entries"
    acc.remove()
    return acc.passes, {n: (acc.scores[n] - want[n]).abs().max().item() for n in want}


def test_local_gradient_squares_see_each_ranks_own_gradients_before_the_hook():
    for passes, err in run_ranks(_local_squares, 2):
        assert passes == 3
        assert max(err.values()) < 1e-5, err


def reference_refresh(current, totals, fraction, always=()):
    names = [n for n in current if n not in always]
    cur = torch.cat([current[n].reshape(-1) for n in names])
    tot = torch.cat([totals[n].double().reshape(-1) for n in names])
    k = int(cur.sum())
    top = set(sorted(range(tot.numel()), key=lambda i: (-float(tot[i]), i))[:k])
    grow = sorted((i for i in top if not cur[i]), key=lambda i: (-float(tot[i]), i))
    drop = sorted((i for i in range(tot.numel()) if cur[i] and i not in top), key=lambda i: (float(tot[i]), i))
    new = cur.clone()
    for g, d in list(zip(grow, drop))[:int(fraction * k)]:
        if not tot[g] > tot[d]:
            break
        new[g], new[d] = True, False
    out, lo = {}, 0
    for n in current:
        if n in always:
            out[n] = current[n]
        else:
            out[n] = new[lo:lo + current[n].numel()].reshape(current[n].shape)
            lo += current[n].numel()
    return out


SHAPES = {"a": (30, 20), "b": (50,), "head": (4, 3)}


def rank_scores(rank, ties):
    g = torch.Generator().manual_seed(100 + rank)
    out = {n: torch.rand(s, generator=g) ** 3 for n, s in SHAPES.items()}
    if ties:  # many exact zeros (entries no gradient touched) and repeated values
        out["a"][:10] = 0.0
        out["b"][::2] = 0.25
    return out


def current_mask():
    g = torch.Generator().manual_seed(5)
    bits = {n: torch.rand(s, generator=g) < 0.1 for n, s in SHAPES.items()}
    bits["head"] = torch.ones(SHAPES["head"], dtype=torch.bool)
    return Mask(bits)


def _refresh(rank, world, fraction, ties):
    stats = {}
    mask = refresh_mask(current_mask(), rank_scores(rank, ties), max_change=fraction, always=["head"], stats=stats)
    return {n: b.clone() for n, b in mask.items()}, stats


@pytest.mark.parametrize("fraction,ties", [(0.1, False), (1.0, False), (0.3, True), (0.0, False)])
def test_refresh_on_two_ranks_equals_the_reference_on_summed_scores(fraction, ties):
    results = run_ranks(_refresh, 2, fraction, ties)
    (got, stats), (other, _) = results
    assert all(torch.equal(got[n], other[n]) for n in got)
    totals = {n: rank_scores(0, ties)[n].double() + rank_scores(1, ties)[n].double() for n in SHAPES}
    cur = current_mask()
    want = reference_refresh(cur, totals, fraction, always=("head",))
    for n in want:
        assert torch.equal(got[n], want[n]), n
    k = sum(int(cur[n].sum()) for n in ("a", "b"))
    changed = sum(int((got[n] & ~cur[n]).sum()) for n in ("a", "b"))
    assert changed == stats["grown"] <= int(fraction * k), "the drop/grow limit holds"
    assert sum(int(got[n].sum()) for n in ("a", "b")) == k and got["head"].all()
    if fraction == 0.1:
        assert stats["wanted"] > stats["grown"] > 0, "the case exercises the limit"
    assert stats["bytes_sent"] > 0


def test_equal_scores_keep_the_current_mask():
    cur = current_mask()
    flat = {n: torch.zeros(s) for n, s in SHAPES.items()}
    assert refresh_mask(cur, flat, max_change=1.0, always=["head"]).digest() == cur.digest()
    with pytest.raises(ValueError, match="max_change=1.5"):
        refresh_mask(cur, flat, max_change=1.5)


# ---------------------------------------------------------------- lottery-ticket change

def test_change_mask_is_the_topk_of_the_absolute_change_and_rewind_restores():
    m = mlp()
    theta0 = snapshot(m)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    n = sum(p.numel() for p in m.parameters())
    mask = change_mask(m, theta0, density=0.25, always=["fc2.bias"])
    want = reference_topk({k: (p.detach() - theta0[k]).abs() for k, p in m.named_parameters()}, round(0.25 * n),
                          always=("fc2.bias",))
    assert all(torch.equal(mask[k], want[k]) for k in want)
    rewind(m, theta0)
    assert all(torch.equal(p.detach(), theta0[k]) for k, p in m.named_parameters())


def test_a_transposed_conv1d_weight_is_normalised_along_its_input_axis():
    """GPT-2's Conv1D stores (in, out): its scores scale along rows, as a Linear's along columns."""
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(6, 4))
    conv = nn.Sequential(conv1d(4, 6))
    with torch.no_grad():
        conv[0].weight.copy_(lin[0].weight.t())
        conv[0].bias.copy_(lin[0].bias)
    x = [(torch.randn(5, 6) * torch.tensor([9.0, 1, 1, 1, 2, 1]), torch.zeros(5))]
    a_lin = input_activation_scales(lin, x, num_samples=5)
    a_conv = input_activation_scales(conv, x, num_samples=5)
    torch.testing.assert_close(a_lin["0.weight"], a_conv["0.weight"])
    base = torch.rand(4, 6)
    for how in ("activation", "rows_and_columns"):
        s_lin, s_conv = {"0.weight": base.clone()}, {"0.weight": base.t().clone()}
        normalise_scores(s_lin, lin, how, activation_scales=a_lin)
        normalise_scores(s_conv, conv, how, activation_scales=a_conv)
        torch.testing.assert_close(s_conv["0.weight"], s_lin["0.weight"].t())
