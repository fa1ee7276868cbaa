"""The masked all-reduce hook against an independent reference: every rank recomputes every
rank's local gradient on a plain (non-DDP) copy of the model, averages them itself, and applies
the mask. No communication is involved in the reference."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsecomm
from multirank import run_ranks
from sparsecomm.distributed import RankDisagreement

STEPS = 4


class Net(nn.Module):
    def __init__(self, unused: bool = False):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                                  nn.Linear(64, 64), nn.Tanh())
        self.head = nn.Linear(64, 5)
        self.spare = nn.Linear(64, 64) if unused else None  # never used in forward

    def forward(self, x):
        return self.head(self.body(x))


def make_model(unused=False):
    torch.manual_seed(0)
    return Net(unused)


def batch(rank, step, micro=0):
    g = torch.Generator().manual_seed(1000 * step + 10 * rank + micro)
    return torch.randn(8, 16, generator=g), torch.randint(0, 5, (8,), generator=g)


def local_grads(model, rank, step, micros=1):
    model.zero_grad(set_to_none=False)
    for m in range(micros):
        x, y = batch(rank, step, m)
        nn.functional.cross_entropy(model(x), y).backward()
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def hook_vs_reference(rank, world, ddp_kwargs, hook_kwargs, micros=1, unused=False):
    model = make_model(unused)
    ref = copy.deepcopy(model)
    mask = sparsecomm.random_mask(model, density=0.3, seed=7)
    ddp = DDP(model, bucket_cap_mb=0.02, **ddp_kwargs)  # 20 KB buckets: several of them
    state = sparsecomm.register_masked_allreduce(ddp, mask, **hook_kwargs)
    opt, ref_opt = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    errs = []
    for step in range(STEPS):
        opt.zero_grad(set_to_none=False)
        for m in range(micros):
            x, y = batch(rank, step, m)
            if m < micros - 1:
                with ddp.no_sync():
                    nn.functional.cross_entropy(ddp(x), y).backward()
            else:
                nn.functional.cross_entropy(ddp(x), y).backward()
        per_rank = [local_grads(ref, r, step, micros) for r in range(world)]
        for n, p in ref.named_parameters():
            expected = sum(g[n] for g in per_rank) / world * mask[n]
            got = dict(model.named_parameters())[n].grad
            got = torch.zeros_like(p) if got is None else got
            assert torch.equal(got[~mask[n]], torch.zeros_like(got[~mask[n]])), f"{n}: unmasked entry not zero"
            errs.append(((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item())
            p.grad = expected.clone()
        opt.step()
        ref_opt.step()
    return max(errs), state.bytes_sent, state.dense_bytes, state.steps, state.num_plans, mask.num_selected


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("fused", [True, False])
def test_masked_grads_equal_cross_rank_mean(world, fused):
    results = run_ranks(hook_vs_reference, world, {}, {"fused": fused})
    n = sum(p.numel() for p in make_model().parameters())
    for err, sent, dense, steps, nplans, k in results:
        assert err < 1e-5
        assert steps == STEPS
        assert nplans > 1, "the test must exercise several buckets"
        assert sent == STEPS * k * 4, "fp32 wire: 4 bytes per selected entry per step"
        assert dense == STEPS * n * 4


@pytest.mark.parametrize("ddp_kwargs", [
    {"gradient_as_bucket_view": True},
    {"static_graph": True},
    {"find_unused_parameters": True},
], ids=["bucket_view", "static_graph", "find_unused"])
def test_ddp_modes(ddp_kwargs):
    unused = "find_unused_parameters" in ddp_kwargs
    for err, *_ in run_ranks(hook_vs_reference, 2, ddp_kwargs, {}, 1, unused):
        assert err < 1e-5


def test_no_sync_accumulation():
    for err, sent, _, steps, _, k in run_ranks(hook_vs_reference, 2, {}, {}, 3):
        assert err < 1e-5
        assert steps == STEPS and sent == STEPS * k * 4, "no_sync micro-steps must send nothing"


@pytest.mark.parametrize("wire", ["fp16", "bf16"])
def test_half_precision_wire(wire):
    for err, sent, _, _, _, k in run_ranks(hook_vs_reference, 2, {}, {"wire_dtype": wire}):
        assert err < (2e-3 if wire == "fp16" else 1.6e-2)
        assert sent == STEPS * k * 2


def dense_steps(rank, world):
    model = make_model()
    ref = copy.deepcopy(model)
    mask = sparsecomm.random_mask(model, density=0.1, seed=1)
    ddp = DDP(model, bucket_cap_mb=0.02)
    state = sparsecomm.register_masked_allreduce(ddp, mask)
    sent = []
    for step, dense in enumerate([False, True, False]):
        state.dense = dense
        before = state.bytes_sent
        ddp.zero_grad()
        x, y = batch(rank, step)
        nn.functional.cross_entropy(ddp(x), y).backward()
        sent.append(state.bytes_sent - before)
        if dense:
            per_rank = [local_grads(ref, r, step) for r in range(world)]
            err = max((p.grad - sum(g[n] for g in per_rank) / world).abs().max().item()
                      for n, p in model.named_parameters())
    return sent, err, mask.num_selected


def test_dense_switch_per_step():
    n = sum(p.numel() for p in make_model().parameters())
    for sent, err, k in run_ranks(dense_steps, 2):
        assert sent == [4 * k, 4 * n, 4 * k]
        assert err < 1e-6


def disagreeing_masks(rank, world):
    model = make_model()
    mask = sparsecomm.random_mask(model, density=0.1, seed=rank)
    try:
        sparsecomm.register_masked_allreduce(DDP(model), mask)
    except RankDisagreement as e:
        return str(e)
    return None


def test_ranks_with_different_masks_are_refused():
    msgs = run_ranks(disagreeing_masks, 2)
    for m in msgs:
        assert m is not None and "rank 0:" in m and "rank 1:" in m and "mask digest" in m


def nonfinite_step(rank, world):
    model = make_model()
    mask = sparsecomm.random_mask(model, density=0.5, seed=0)
    ddp = DDP(model)
    state = sparsecomm.register_masked_allreduce(ddp, mask)
    flags = []
    for step in range(3):
        ddp.zero_grad()
        x, y = batch(rank, step)
        if step == 1 and rank == 1:
            x[0, 0] = float("nan")  # only rank 1 sees bad data
        nn.functional.cross_entropy(ddp(x), y).backward()
        flags.append(state.found_nonfinite())
    return flags


def test_nonfinite_detected_identically_on_every_rank():
    assert run_ranks(nonfinite_step, 2) == [[False, True, False]] * 2


def state_roundtrip(rank, world):
    model = make_model()
    mask = sparsecomm.random_mask(model, density=0.2, seed=3)
    ddp = DDP(model)
    state = sparsecomm.register_masked_allreduce(ddp, mask)
    x, y = batch(rank, 0)
    nn.functional.cross_entropy(ddp(x), y).backward()
    sd = state.state_dict()
    ddp2 = DDP(make_model())
    state2 = sparsecomm.register_masked_allreduce(ddp2, mask)
    state2.load_state_dict(sd)
    other = sparsecomm.register_masked_allreduce(DDP(make_model()), sparsecomm.random_mask(model, density=0.2, seed=4))
    with pytest.raises(ValueError, match="load the mask saved with the checkpoint"):
        other.load_state_dict(sd)
    return state2.state_dict() == sd and sd["steps"] == 1


def test_state_dict_roundtrip():
    assert run_ranks(state_roundtrip, 2) == [True, True]


def test_register_on_plain_module_is_refused():
    model = make_model()
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        sparsecomm.register_masked_allreduce(model, sparsecomm.random_mask(model, density=0.1))


def test_bad_wire_dtype_is_refused():
    from sparsecomm.hook import resolve_wire_dtype
    with pytest.raises(ValueError, match="wire_dtype='int8'"):
        resolve_wire_dtype("int8")


def state_without_module(rank, world):
    """After a few steps the hook's state is kept and everything else dropped: the module must go
    (the state refers to no module); its stats() still report what was sent; a refreshed mask
    made for another model is refused by the parameter it does not fit."""
    import gc
    import weakref

    model = make_model()
    mask = sparsecomm.random_mask(model, density=0.2, seed=3)
    ddp = DDP(model, bucket_cap_mb=0.02)
    state = sparsecomm.register_masked_allreduce(ddp, mask)
    for step in range(2):
        x, y = batch(rank, step)
        nn.functional.cross_entropy(ddp(x), y).backward()
    other = nn.Linear(16, 3)
    try:
        state.set_mask(sparsecomm.random_mask(other, density=0.5))
        refused = None
    except sparsecomm.mask.MaskMismatch as e:
        refused = str(e)
    stats = state.stats()
    alive = weakref.ref(model)
    del ddp, model
    gc.collect()
    return alive() is None, tuple(stats), refused, mask.num_selected


def test_the_state_holds_no_module_and_reports_through_stats():
    n = sum(p.numel() for p in make_model().parameters())
    for freed, stats, refused, k in run_ranks(state_without_module, 2):
        assert freed, "the hook's state kept the module alive"
        rate, dense, sent, steps, plans, plan_bytes = stats
        assert (dense, sent, steps) == (2 * n * 4, 2 * k * 4, 2) and rate == pytest.approx(n / k)
        assert plans > 1 and plan_bytes == 8 * k, "one int64 index per selected entry, over several buckets"
        assert refused is not None and "parameter 'body.0.weight'" in refused, refused
