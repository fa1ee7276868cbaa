"""Diff pruning: hard-concrete gates and the L0 penalty against their closed forms (written out
here in numpy, float64), exact-count projection against a stable-argsort reference, and the
L0 phase's dense traffic counted by the hook on 2 Gloo ranks."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import sparsecomm
import sparsecomm.diff as sdiff
from multirank import run_ranks
from sparsecomm import diff_pruning as dp
from sparsecomm.diff_pruning import DiffPruning, project


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def _hc_cdf(t, log_alpha, l, r, beta):
    """P(z <= t) of the hard-concrete gate for 0 <= t < 1 (Louizos et al. 2018): the stretched
    binary concrete s_bar = l + (r - l) s has P(s <= q) = sigmoid(beta * logit(q) - log_alpha)."""
    q = (t - l) / (r - l)
    return _sigmoid(beta * math.log(q / (1 - q)) - log_alpha)


def net(seed=0, out=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, out))


@pytest.mark.parametrize("l,r,beta", [(-1.5, 1.5, 1.0), (-0.1, 1.1, 2 / 3), (-1.5, 1.5, 0.5)])
@pytest.mark.parametrize("log_alpha", [5.0, 0.3, -1.0])
def test_gate_samples_follow_the_hard_concrete_distribution(l, r, beta, log_alpha):
    n = 200_000
    gen = torch.Generator().manual_seed(1234)
    z = dp.sample_gates(torch.full((n,), log_alpha, dtype=torch.float64), l=l, r=r, temperature=beta,
                        generator=gen).numpy()
    assert z.min() >= 0.0 and z.max() <= 1.0
    tol = 5 * math.sqrt(0.25 / n)  # 5 sigma of a proportion
    # point masses at 0 and 1, and the CDF in between
    assert abs((z == 0).mean() - _hc_cdf(0.0, log_alpha, l, r, beta)) < tol
    assert abs((z == 1).mean() - (1 - _hc_cdf(1 - 1e-12, log_alpha, l, r, beta))) < tol
    for t in (0.1, 0.25, 0.5, 0.75, 0.9):
        assert abs((z <= t).mean() - _hc_cdf(t, log_alpha, l, r, beta)) < tol, t


@pytest.mark.parametrize("l,r,beta", [(-1.5, 1.5, 1.0), (-0.1, 1.1, 2 / 3)])
def test_expected_l0_matches_formula_and_monte_carlo(l, r, beta):
    log_alpha = torch.linspace(-4, 6, 41, dtype=torch.float64)
    ref = _sigmoid(log_alpha.numpy() - beta * math.log(-l / r))
    got = dp.prob_nonzero(log_alpha, l=l, r=r, temperature=beta).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-12)
    assert float(dp.expected_l0(log_alpha, l=l, r=r, temperature=beta)) == pytest.approx(ref.sum(), rel=1e-12)
    # the formula is P(z != 0) of the sampler itself
    reps = 4000
    gen = torch.Generator().manual_seed(7)
    z = dp.sample_gates(log_alpha.repeat(reps, 1), l=l, r=r, temperature=beta, generator=gen)
    np.testing.assert_allclose((z > 0).double().mean(0).numpy(), ref, atol=5 * math.sqrt(0.25 / reps))


def test_paper_defaults_and_deterministic_gate():
    assert dp.STRETCH == (-1.5, 1.5) and dp.LOG_ALPHA_INIT == 5.0 and dp.TEMPERATURE == 1.0
    # at the paper's init, P(gate open) = sigmoid(5 - log 1) = sigmoid(5)
    assert float(dp.prob_nonzero(torch.tensor(5.0))) == pytest.approx(1 / (1 + math.exp(-5)))
    la = torch.tensor([-3.0, -0.01, 0.0, 0.01, 0.5, 5.0], dtype=torch.float64)
    ref = np.clip(_sigmoid(la.numpy()) * 3.0 - 1.5, 0, 1)
    np.testing.assert_allclose(dp.deterministic_gates(la).numpy(), ref, rtol=1e-12)
    assert dp.deterministic_gates(la)[2] == 0 and dp.deterministic_gates(la)[-1] == 1


@pytest.mark.parametrize("kw,msg", [(dict(l=0.1), "l < 0"), (dict(r=0.9), "r > 1"), (dict(temperature=0.0), "> 0")])
def test_bad_gate_settings(kw, msg):
    with pytest.raises(ValueError, match=msg):
        dp.sample_gates(torch.zeros(3), **kw)


def test_wrapper_starts_at_base_and_trains_only_diff_and_gates():
    base = net()
    x = torch.randn(16, 5)
    want = base(x).detach()
    w = DiffPruning(base)
    for mode in (w.train, w.eval):
        mode()
        assert torch.equal(w(x), want)  # w = 0: exactly the base, sampled gates or not
    w.train()
    assert not any(p.requires_grad for p in base.parameters())
    n = sum(p.numel() for p in base.parameters())
    assert w.numel == n and w.comm_numel == 2 * n and w.comm_bytes_per_step() == 8 * n
    loss = w(x).square().mean()
    loss.backward()
    assert all(p.grad is None for p in base.parameters())
    assert all(d.grad is not None and d.grad.abs().sum() > 0 for d in w.diff)
    # dL/dlog_alpha = dL/dtheta * w * dz/dlog_alpha = 0 while w = 0 (the paper's init)
    assert all(torch.count_nonzero(la.grad) == 0 for la in w.log_alpha)


def test_expected_l0_of_the_wrapper_unstructured_structured_and_ungated():
    base = net()
    w = DiffPruning(base, structured=True, ungated=["2.*"])
    assert w.gated == ["0.weight", "0.bias"]
    with torch.no_grad():
        w.log_alpha[0].copy_(torch.linspace(-3, 3, 35).reshape(7, 5))
        w.group_log_alpha.copy_(torch.tensor([1.0, -2.0]))
    c = math.log(1.5 / 1.5)
    p = [_sigmoid(la.detach().numpy() - c).sum() for la in w.log_alpha]
    g = _sigmoid(np.array([1.0, -2.0]) - c)
    assert w.expected_l0().item() == pytest.approx(p[0] * g[0] + p[1] * g[1], rel=1e-6)
    assert w.comm_numel == 2 * (35 + 7) + (21 + 3) + 2  # gated w+alpha, ungated w, 2 group gates
    u = DiffPruning(net())
    assert u.expected_l0().item() == pytest.approx(sum(p.numel() for p in net().parameters()) / (1 + math.exp(-5)),
                                                   rel=1e-6)
    # a closed group gate removes its whole tensor from the diff
    with torch.no_grad():
        for d in w.diff:
            d.fill_(0.5)
        w.group_log_alpha[1] = -10.0
    d = w.diff_vector()
    zg = np.clip(_sigmoid(1.0) * 3 - 1.5, 0, 1)
    zi = np.clip(_sigmoid(w.log_alpha[0].detach().numpy()) * 3 - 1.5, 0, 1)
    np.testing.assert_allclose(d["0.weight"].numpy(), 0.5 * zi * zg, rtol=1e-5)
    assert torch.count_nonzero(d["0.bias"]) == 0 and (d["2.weight"] == 0.5).all()  # closed / ungated


def test_l0_penalty_closes_gates_under_gradient_descent():
    w = DiffPruning(net())
    before = w.expected_l0().item()
    for _ in range(20):  # plain gradient descent on the penalty alone (lr large: sigmoid'(5) is small)
        w.zero_grad()
        w.expected_l0().backward()
        with torch.no_grad():
            for la in w.log_alpha:
                la -= 300.0 * la.grad
    assert w.expected_l0().item() < 0.5 * before


def _reference_topk(diff: dict, k: int) -> dict:
    """Independent reference: stable argsort of -|d| over the concatenation (ties by position)."""
    flat = np.concatenate([d.abs().reshape(-1).double().numpy() for d in diff.values()])
    order = np.argsort(-flat, kind="stable")[:k]
    sel = np.zeros(flat.size, dtype=bool)
    sel[order] = True
    out, off = {}, 0
    for n, d in diff.items():
        out[n] = torch.from_numpy(sel[off:off + d.numel()].reshape(tuple(d.shape)))
        off += d.numel()
    return out


@pytest.mark.parametrize("density", [0.001, 0.01, 0.1, 0.37, 1.0])
def test_projection_gives_exactly_k_with_deterministic_ties(density):
    g = torch.Generator().manual_seed(0)
    # quantised values: many exact ties in |diff|, including sign ties (+x, -x) and zeros
    diff = {"a": (torch.randint(-4, 5, (40, 50), generator=g) * 0.25),
            "b": (torch.randint(-4, 5, (977,), generator=g) * 0.25),
            "c": torch.zeros(3, 3)}
    n = 40 * 50 + 977 + 9
    mask = project(diff, density)
    k = round(density * n)
    assert mask.num_selected == k
    ref = _reference_topk(diff, k)
    for name in diff:
        assert torch.equal(mask[name], ref[name]), name
    # deterministic: the same input gives the same mask (every rank projects the same diff)
    assert project({k_: v.clone() for k_, v in diff.items()}, density).digest() == mask.digest()


def test_projection_threshold_is_global_and_keeps_always_whole():
    diff = {"w": torch.tensor([0.1, -5.0, 0.2, 3.0]), "head.weight": torch.tensor([1e-6, 0.0]),
            "v": torch.tensor([[-4.0, 0.05], [2.5, -0.3]])}
    m = project(diff, 0.5, always=["head.*"])  # k = 5: head (2) + the 3 largest |d| elsewhere
    assert m["head.weight"].all()
    assert m["w"].tolist() == [False, True, False, True] and m["v"].tolist() == [[True, False], [False, False]]
    with pytest.raises(ValueError, match="mask.density"):
        project(diff, 0.0)


def test_project_and_materialize_on_the_wrapper(tmp_path):
    base = net()
    w = DiffPruning(base, ungated=["2.*"])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for d in w.diff:
            d.copy_(torch.randn(d.shape, generator=g))
        w.log_alpha[0][0, :] = -3.0   # closed gates: zero diff there, never above the threshold
    mask = w.project(0.4, always=["2.*"])
    assert set(mask) == {n for n, _ in base.named_parameters()}
    assert mask.num_selected == round(0.4 * w.numel) and mask["2.weight"].all()
    assert not mask["0.weight"][0, :].any()
    model = w.materialize(mask)
    assert type(model) is type(base) and all(p.requires_grad for p in model.parameters())
    dv = w.diff_vector()
    for name, p in model.named_parameters():
        b = dict(base.named_parameters())[name]
        assert torch.equal(p[~mask[name]], b[~mask[name]])             # bit-identical outside
        assert torch.equal(p[mask[name]], (b + dv[name])[mask[name]])  # base + z * w inside
    # the plain model round-trips through the sparse task diff
    path = tmp_path / "t.safetensors"
    sdiff.save(model, base, mask, path)
    rebuilt = sdiff.apply(base, path)
    for (n1, a), (n2, b) in zip(rebuilt.state_dict().items(), model.state_dict().items()):
        assert n1 == n2 and torch.equal(a, b)


def _l0_phase_bytes(rank, world_size):
    torch.manual_seed(0)
    base = net()
    w = DiffPruning(base, structured=True)
    ddp = torch.nn.parallel.DistributedDataParallel(w)
    state = sparsecomm.register_masked_allreduce(ddp, sparsecomm.Mask.full(w))
    state.dense = True
    torch.manual_seed(100 + rank)
    per_step = []
    for _ in range(3):
        before = state.bytes_sent
        loss = ddp(torch.randn(8, 5)).square().mean() + 1e-3 * w.expected_l0()
        loss.backward()
        per_step.append(state.bytes_sent - before)
    return per_step, w.comm_bytes_per_step(4), w.comm_numel


def test_l0_phase_traffic_is_dense_and_counted_by_the_hook():
    torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)  # import torch._dynamo once, before the fork
    results = run_ranks(_l0_phase_bytes, 2)
    n = sum(p.numel() for p in net().parameters())
    for per_step, expected, numel in results:
        assert numel == 2 * n + 4  # w and log_alpha per entry, one group gate per tensor (4 tensors)
        assert per_step == [expected] * 3
