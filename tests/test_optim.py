"""Masked optimizers against torch.optim on the selected entries; the rest must not move a bit."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsecomm
from multirank import run_ranks


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 4))


def grads_for(model, step):
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(16, 10, generator=g), torch.randint(0, 4, (16,), generator=g)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()


CASES = [
    (sparsecomm.MaskedAdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    (sparsecomm.MaskedAdamW, torch.optim.AdamW, dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0)),
    (sparsecomm.MaskedSGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
    (sparsecomm.MaskedSGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
    (sparsecomm.MaskedSGD, torch.optim.SGD, dict(lr=0.1)),
]


@pytest.mark.parametrize("masked_cls,torch_cls,kw", CASES)
def test_selected_entries_follow_torch_and_frozen_entries_do_not_move(masked_cls, torch_cls, kw):
    model = net()
    initial = copy.deepcopy(model)
    ref = copy.deepcopy(model)
    mask = sparsecomm.random_mask(model, density=0.2, seed=5)
    opt, ref_opt = masked_cls(model, mask, **kw), torch_cls(ref.parameters(), **kw)
    for step in range(60):
        grads_for(model, step)
        opt.step()
        opt.zero_grad()
        # The reference moves every entry (weight decay), so before each step its unselected
        # entries are reset to the masked model's, and its unselected gradients are zeroed.
        with torch.no_grad():
            for (n, p), q in zip(model.named_parameters(), ref.parameters()):
                q.copy_(torch.where(mask[n], q, dict(initial.named_parameters())[n]))
        grads_for(ref, step)
        for (n, _), q in zip(model.named_parameters(), ref.parameters()):
            q.grad = torch.where(mask[n], q.grad, torch.zeros_like(q.grad))
        ref_opt.step()
    for (n, p), q, p0 in zip(model.named_parameters(), ref.parameters(), initial.parameters()):
        assert torch.equal(p[~mask[n]], p0[~mask[n]]), f"{n}: an unselected entry moved"
        torch.testing.assert_close(p[mask[n]], q[mask[n]], rtol=1e-6, atol=1e-7)
        assert mask[n].sum() == 0 or not torch.equal(p[mask[n]], p0[mask[n]]), f"{n}: nothing trained"


def test_state_has_k_entries():
    model = net()
    mask = sparsecomm.random_mask(model, density=0.1, seed=0)
    opt = sparsecomm.MaskedAdamW(model, mask, lr=1e-3)
    grads_for(model, 0)
    opt.step()
    assert opt.state_bytes() == 2 * mask.num_selected * 4 + 4  # exp_avg, exp_avg_sq, step (fp32 scalar)
    dense = torch.optim.AdamW(model.parameters())
    dense.step()
    dense_bytes = sum(v.numel() * v.element_size() for s in dense.state.values() for v in s.values())
    assert opt.state_bytes() < 0.15 * dense_bytes


def test_state_dict_roundtrip_continues_identically():
    mask = sparsecomm.random_mask(net(), density=0.3, seed=2)
    a = net()
    opt_a = sparsecomm.MaskedAdamW(a, mask, lr=1e-2)
    for s in range(10):
        grads_for(a, s)
        opt_a.step()
    b = net()
    opt_b = sparsecomm.MaskedAdamW(b, mask, lr=1e-2)
    for s in range(5):
        grads_for(b, s)
        opt_b.step()
    sd = copy.deepcopy(opt_b.state_dict())
    c = copy.deepcopy(b)
    opt_c = sparsecomm.MaskedAdamW(c, mask, lr=1e-2)
    opt_c.load_state_dict(sd)
    for s in range(5, 10):
        grads_for(c, s)
        opt_c.step()
    for p, q in zip(a.parameters(), c.parameters()):
        assert torch.equal(p, q)
    other = sparsecomm.MaskedAdamW(net(), sparsecomm.random_mask(net(), density=0.3, seed=3))
    with pytest.raises(ValueError, match="build the optimizer with the mask saved"):
        other.load_state_dict(sd)


def test_lr_scheduler_works():
    model = net()
    opt = sparsecomm.MaskedSGD(model, sparsecomm.random_mask(model, density=0.5), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    grads_for(model, 0)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.5


def test_reset_mask_carries_state_of_kept_entries():
    model = net()
    m1 = sparsecomm.random_mask(model, density=0.3, seed=1)
    m2 = sparsecomm.random_mask(model, density=0.3, seed=2)
    opt = sparsecomm.MaskedAdamW(model, m1, lr=1e-2)
    grads_for(model, 0)
    opt.step()
    old = {}  # (param name, flat position) -> exp_avg
    (packed,) = opt.param_groups[0]["params"]
    exp_avg = opt.state[packed]["exp_avg"]
    i = 0
    for n, _ in model.named_parameters():
        for pos in m1.flat_indices(n).tolist():
            old[(n, pos)] = exp_avg[i].item()
            i += 1
    opt.reset_mask(m2)
    (packed,) = opt.param_groups[0]["params"]
    new = opt.state[packed]["exp_avg"]
    assert new.numel() == m2.num_selected
    i, carried = 0, 0
    for n, _ in model.named_parameters():
        for pos in m2.flat_indices(n).tolist():
            want = old.get((n, pos), 0.0)
            carried += (n, pos) in old
            assert new[i].item() == want
            i += 1
    assert carried > 0
    grads_for(model, 1)
    opt.step()  # still runs with the new layout


def ddp_train(rank, world):
    model = net()
    frozen = copy.deepcopy(model)
    mask = sparsecomm.random_mask(model, density=0.2, seed=9)
    ddp = DDP(model, bucket_cap_mb=0.001)
    sparsecomm.register_masked_allreduce(ddp, mask)
    opt = sparsecomm.MaskedAdamW(ddp, mask, lr=1e-2, weight_decay=0.1)
    for step in range(20):
        g = torch.Generator().manual_seed(100 * rank + step)
        x, y = torch.randn(8, 10, generator=g), torch.randint(0, 4, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    moved_frozen = any(not torch.equal(p[~mask[n]], q[~mask[n]])
                       for (n, p), q in zip(model.named_parameters(), frozen.parameters()))
    return [p.detach().clone() for p in model.parameters()], moved_frozen


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_stay_bit_identical(world):
    results = run_ranks(ddp_train, world)
    for params, moved in results:
        assert not moved
        for p, q in zip(params, results[0][0]):
            assert torch.equal(p, q)


def test_optimizers_and_packing_follow_the_parameters_device():
    """CUDA readiness checked without a GPU: on the "meta" device any tensor the library made on
    the CPU by default and mixed with the parameters' would raise. State, packed values, plans
    and reset_mask all stay on the parameters' device (tests/test_gpu.py runs them on CUDA)."""
    from sparsecomm.packing import build_plan, pack, unpack_

    cpu = net()
    mask, other = (sparsecomm.random_mask(cpu, density=0.3, seed=s) for s in (1, 2))
    model = copy.deepcopy(cpu).to("meta")
    for cls in (sparsecomm.MaskedAdamW, sparsecomm.MaskedSGD):
        opt = cls(model, mask, lr=0.1, **({"momentum": 0.9} if cls is sparsecomm.MaskedSGD else {}))
        for _ in range(2):
            for p in model.parameters():
                p.grad = torch.empty_like(p)
            opt.step()
            opt.reset_mask(other)
        assert all(t.device.type == "meta" for t in opt.param_groups[0]["params"])
        moments = [t for st in opt.state.values() for k, t in st.items() if k != "step"]  # torch keeps step on CPU
        assert moments and all(t.device.type == "meta" for t in moments)
    params = list(model.parameters())
    bits = {p: mask[n].reshape(-1) for (n, _), p in zip(model.named_parameters(), params)}
    plan = build_plan(params, bits, torch.device("meta"))
    buffer = torch.empty(plan.numel, device="meta")
    assert plan.index.device.type == "meta" and pack(buffer, plan).device.type == "meta"
    assert unpack_(buffer, plan, torch.empty(plan.k, device="meta")).device.type == "meta"
