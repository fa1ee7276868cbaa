"""The ``comm`` options on 2 Gloo ranks, each against a reference computed without DDP.

Every rank recomputes every rank's local gradient on a plain copy of the model (no
communication) and derives what the option must deliver: the mean (dense), the mean within the
wire dtype's rounding (fp16/bf16), PowerSGD's rank-r compression computed by hand from the
gathered inputs (and its error feedback), the masked mean (masked), and for post-local SGD the
parameters equal right after each averaging (their mean) and different between. Bytes counted
by the sync are compared with a tap on ``torch.distributed.all_reduce`` (every payload handed to
it, hooks and averaging alike); the dense option's all-reduce is DDP's C++ one, which no Python
tap sees: it is compared with n x 4 computed from the model.
"""
import copy

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import nn

from multirank import run_ranks
from sparsecomm.app import schema
from sparsecomm.app.comm import COMM_OPTIONS, build_comm
from sparsecomm.mask import random_mask

CPU = torch.device("cpu")


def comm_cfg(name: str, **fields):
    return OmegaConf.merge(OmegaConf.structured(schema.OPTIONS["comm"][name]), {"name": name, **fields})


class Tap:
    """Adds up the payload of every ``dist.all_reduce`` call while installed."""

    def __init__(self):
        self.bytes, self.real = 0, dist.all_reduce

        def all_reduce(tensor, *args, **kwargs):
            self.bytes += tensor.numel() * tensor.element_size()
            return self.real(tensor, *args, **kwargs)

        dist.all_reduce = all_reduce

    def remove(self):
        dist.all_reduce = self.real


def make_model(bias=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 32, bias=bias), nn.Tanh(), nn.Linear(32, 6, bias=bias))


def batch(rank, step):
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(8, 24, generator=g), torch.randint(0, 6, (8,), generator=g)


def local_grads(ref, rank, step):
    ref.zero_grad(set_to_none=False)
    x, y = batch(rank, step)
    nn.functional.cross_entropy(ref(x), y).backward()
    return {n: p.grad.clone() for n, p in ref.named_parameters()}


def backward(sync, rank, step):
    x, y = batch(rank, step)
    nn.functional.cross_entropy(sync.ddp(x), y).backward()
    sync.after_backward()


def grads_vs_mean(rank, world, name, fields, steps=3):
    """The option's reduced gradient and the cross-rank mean of local gradients (no DDP), per step."""
    model = make_model()
    ref = copy.deepcopy(model)
    sync = build_comm(comm_cfg(name, **fields), model, CPU)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tap, out = Tap(), []
    for step in range(steps):
        backward(sync, rank, step)
        per_rank = [local_grads(ref, r, step) for r in range(world)]
        for n, p in model.named_parameters():
            mean = sum(g[n] for g in per_rank) / world
            out.append((n, p.grad.clone(), mean))
            dict(ref.named_parameters())[n].grad = p.grad.clone()
        assert not sync.found_nonfinite(model)
        opt.step()
        sync.after_update()
        torch.optim.SGD(ref.parameters(), lr=0.1).step()
        opt.zero_grad()
    tap.remove()
    return out, tap.bytes, sync.stats()


def n_entries():
    return sum(p.numel() for p in make_model().parameters())


def test_the_registry_and_the_yamls_name_the_same_options():
    from pathlib import Path

    names = {p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "comm").glob("*.yaml")}
    assert names == set(COMM_OPTIONS) == set(schema.OPTIONS["comm"])
    assert [n for n, cls in COMM_OPTIONS.items() if cls.uses_mask] == ["masked"]
    assert all(schema.OPTIONS["comm"][n].uses_mask == cls.uses_mask for n, cls in COMM_OPTIONS.items())


def test_dense_is_the_mean_and_sends_every_entry():
    for out, tapped, stats in run_ranks(grads_vs_mean, 2, "dense", {}):
        for name, got, mean in out:
            torch.testing.assert_close(got, mean, rtol=1e-5, atol=1e-7, msg=name)
        assert tapped == 0, "dense is DDP's C++ all-reduce: no Python all_reduce call"
        assert stats["bytes_sent"] == stats["dense_bytes"] == 3 * n_entries() * 4
        assert stats["comm"] == "dense" and stats["ratio"] == 1.0


@pytest.mark.parametrize("name,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_is_the_mean_within_rounding(name, dtype):
    eps = torch.finfo(dtype).eps
    for out, tapped, stats in run_ranks(grads_vs_mean, 2, name, {}):
        for pname, got, mean in out:
            tol = 2 * eps * mean.abs().max().item() + 1e-7
            assert (got - mean).abs().max().item() <= tol, pname
            assert torch.equal(got, got.to(dtype).float()), f"{pname}: the values crossed as {dtype}"
        assert stats["bytes_sent"] == tapped == 3 * n_entries() * 2
        assert stats["dense_bytes"] == 3 * n_entries() * 4 and stats["wire_dtype"] == name


def masked_vs_mean(rank, world):
    model = make_model()
    ref = copy.deepcopy(model)
    mask = random_mask(model, density=0.2, seed=5)
    sync = build_comm(comm_cfg("masked"), model, CPU)
    sync.set_mask(mask)
    sync.set_dense(False)
    tap, errs = Tap(), []
    for step in range(3):
        backward(sync, rank, step)
        per_rank = [local_grads(ref, r, step) for r in range(world)]
        for n, p in model.named_parameters():
            errs.append((p.grad - sum(g[n] for g in per_rank) / world * mask[n]).abs().max().item())
        model.zero_grad()
    tap.remove()
    return max(errs), tap.bytes, sync.stats(), mask.num_selected


def test_masked_is_the_masked_mean():
    for err, tapped, stats, k in run_ranks(masked_vs_mean, 2):
        assert err < 1e-6
        assert stats["bytes_sent"] == tapped == 3 * k * 4 and stats["dense_bytes"] == 3 * n_entries() * 4
        assert stats["state_bytes"] == 8 * k, "one int64 index per selected entry"


# --- PowerSGD by hand ------------------------------------------------------------------------------------
def orth(v):
    return v / (v.norm() + 1e-8)


def powersgd_vs_hand(rank, world, steps=5):
    """One weight matrix (12 x 24), rank 1, error feedback, warm start, start_iter 2: from the
    second compressing step on (Q from the last step known), the reduced gradient must be
    P P^T M with M the mean of (local gradient + this rank's error) and P = orth(M orth(Q)); each
    rank's new error must be its input minus that."""
    torch.manual_seed(0)
    model = nn.Linear(24, 12, bias=False)
    ref = copy.deepcopy(model)
    sync = build_comm(comm_cfg("powersgd", rank=1, start_iter=2), model, CPU)
    psgd = sync.tally.psgd
    tap, errs = Tap(), []
    for step in range(steps):
        q0 = psgd.q_memory_dict[0].clone() if 0 in psgd.q_memory_dict else None
        e_old = psgd.error_dict[0].clone() if 0 in psgd.error_dict else torch.zeros(12 * 24)
        grads = [local_grads(ref, r, step)["weight"] for r in range(world)]
        e_all = [torch.zeros_like(e_old) for _ in range(world)]
        dist.all_gather(e_all, e_old)
        backward(sync, rank, step)
        got = model.weight.grad
        inputs = [g + e.view(12, 24) for g, e in zip(grads, e_all)]
        if step < 2:  # plain all-reduce steps
            errs.append((got - sum(grads) / world).abs().max().item())
        elif q0 is not None:
            m = sum(inputs) / world
            p = orth(m @ orth(q0.view(24, 1)))
            hand = p @ (p.T @ m)
            errs.append((got - hand).abs().max().item() / hand.abs().max().item())
            assert torch.linalg.matrix_rank(got, atol=1e-5 * got.abs().max()).item() == 1
            new_err = psgd.error_dict[0].view(12, 24)
            errs.append((new_err - (inputs[rank] - got)).abs().max().item())
        dict(ref.named_parameters())["weight"].data = model.weight.data  # same weights (no update)
        model.zero_grad()
    tap.remove()
    return max(errs), tap.bytes, sync.stats()


def test_powersgd_is_the_rank_r_compression_computed_by_hand():
    for err, tapped, stats in run_ranks(powersgd_vs_hand, 2):
        assert err < 1e-4
        # 2 plain steps of 12 x 24 entries, then 3 steps of P (12) + Q (24)
        assert stats["bytes_sent"] == tapped == (2 * 12 * 24 + 3 * (12 + 24)) * 4
        assert stats["numel_after"] == 3 * (12 + 24) and stats["rank"] == 1


def test_powersgd_sends_vectors_whole():
    for out, tapped, stats in run_ranks(grads_vs_mean, 2, "powersgd", {"rank": 2}):
        for name, got, mean in out[-4:]:  # the last step: compressed
            if got.dim() == 1:
                torch.testing.assert_close(got, mean, msg=name)
        matrices = (32 + 24) * 2 + (6 + 32) * 2
        vectors = 32 + 6
        assert stats["bytes_sent"] == tapped == (2 * n_entries() + (matrices + vectors)) * 4


# --- post-local SGD ----------------------------------------------------------------------------------------
def post_local_run(rank, world, steps=8):
    model = make_model()
    sync = build_comm(comm_cfg("post_local", start_iter=1, period=3), model, CPU)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tap, equal, averaged_ok = Tap(), [], []
    for step in range(steps):
        backward(sync, rank, step)
        assert not sync.found_nonfinite(model)
        opt.step()
        before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        everyone = [torch.zeros_like(before) for _ in range(world)]
        dist.all_gather(everyone, before)
        sync.after_update()
        after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        gathered = [torch.zeros_like(after) for _ in range(world)]
        dist.all_gather(gathered, after)
        equal.append(all(torch.equal(gathered[0], g) for g in gathered))
        if equal[-1] and step >= 1:
            averaged_ok.append(torch.allclose(after, sum(everyone) / world, atol=1e-7))
        opt.zero_grad()
    tap.remove()
    own_storage = len({p.untyped_storage().data_ptr() for p in model.parameters()}) == len(list(model.parameters()))
    return equal, averaged_ok, tap.bytes, sync.stats(), own_storage


def test_post_local_parameters_agree_right_after_each_averaging_only():
    n = n_entries()
    for equal, averaged_ok, tapped, stats, own_storage in run_ranks(post_local_run, 2):
        assert own_storage, "after averaging every parameter has its own storage (safetensors saves it)"
        # step 0: all-reduced gradient; averagings after steps 1, 4, 7; local steps between
        assert equal == [True, True, False, False, True, False, False, True]
        assert averaged_ok == [True, True, True], "an averaging gives the mean of the ranks' parameters"
        flags = 7 * 4  # a 4-byte NaN/Inf flag on each local step
        assert stats["bytes_sent"] == tapped == n * 4 + 3 * n * 4 + flags
        assert stats["averagings"] == 3


def post_local_nonfinite(rank, world):
    model = make_model()
    sync = build_comm(comm_cfg("post_local", start_iter=1, period=4), model, CPU)
    verdicts = []
    for step in range(3):
        backward(sync, rank, step)
        if step == 2 and rank == 1:
            next(model.parameters()).grad[0, 0] = float("nan")  # a local gradient on one rank only
        verdicts.append(sync.found_nonfinite(model))
        model.zero_grad()
    return verdicts


def test_post_local_ranks_agree_on_a_local_nan():
    assert run_ranks(post_local_nonfinite, 2) == [[False, False, True]] * 2


# --- checkpoints and the refusal --------------------------------------------------------------------------
def roundtrip(rank, world, name, fields):
    model = make_model()
    sync = build_comm(comm_cfg(name, **fields), model, CPU)
    for step in range(4):
        backward(sync, rank, step)
        model.zero_grad()
    sd = sync.state_dict()
    again = build_comm(comm_cfg(name, **fields), make_model(), CPU)
    again.load_state_dict(sd)
    same = again.stats() == sync.stats() if name != "powersgd" else again.bytes_sent == sync.bytes_sent
    wrong = build_comm(comm_cfg("dense"), make_model(), CPU)
    try:
        wrong.load_state_dict(sd)
        refused = False
    except ValueError as e:
        refused = f"comm={name}" in str(e)
    return same, refused, sd["steps"]


@pytest.mark.parametrize("name,fields", [("fp16", {}), ("powersgd", {"rank": 2}), ("post_local", {"period": 2})])
def test_state_dict_roundtrip_and_another_option_is_refused(name, fields):
    assert run_ranks(roundtrip, 2, name, fields) == [(True, True, 4)] * 2


def mask_on_fp16(rank, world):
    model = make_model()
    sync = build_comm(comm_cfg("fp16"), model, CPU)
    with pytest.raises(TypeError, match="comm=fp16 .*comm=masked"):
        sync.set_mask(random_mask(model, density=0.1))
    return True


def test_a_mask_on_an_option_without_one_is_refused():
    assert run_ranks(mask_on_fp16, 2) == [True, True]


@pytest.mark.parametrize("fields,field", [({"rank": 0}, "comm.rank"), ({"start_iter": 1}, "comm.start_iter")])
def test_bad_powersgd_fields_name_themselves(fields, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        OmegaConf.to_object(comm_cfg("powersgd", **fields)).check(None)


def optimizer_of_each(rank, world):
    from sparsecomm.optim import MaskedAdamW

    optim = OmegaConf.structured(schema.AdamWConfig(name="adamw"))
    model = make_model()
    mask = random_mask(model, density=0.1, seed=2)
    masked = build_comm(comm_cfg("masked"), model, CPU)
    sparse, sparse_lr = masked.optimizer(optim, mask)
    dense, dense_lr = build_comm(comm_cfg("powersgd"), make_model(), CPU).optimizer(optim, mask)
    return type(sparse) is MaskedAdamW, sparse_lr, type(dense) is torch.optim.AdamW, dense_lr


def test_each_option_builds_its_optimizer():
    assert run_ranks(optimizer_of_each, 2) == [(True, 0.03, True, 0.003)] * 2


def test_optimizer_state_bytes_counts_moments_and_step_counters():
    from sparsecomm.app.optimizers import optimizer_state_bytes
    from sparsecomm.optim import MaskedAdamW

    model = make_model()
    mask = random_mask(model, density=0.1, seed=2)
    dense, masked = torch.optim.AdamW(model.parameters()), MaskedAdamW(model, mask)
    assert optimizer_state_bytes(dense) == 0 == optimizer_state_bytes(None)
    x, y = batch(0, 0)
    nn.functional.cross_entropy(model(x), y).backward()
    dense.step()
    masked.step()
    params = list(model.parameters())
    # AdamW: exp_avg and exp_avg_sq of every entry (fp32) and a 4-byte step counter per parameter
    assert optimizer_state_bytes(dense) == 2 * n_entries() * 4 + len(params) * 4
    # MaskedAdamW: the two moments of the k selected entries, one packed tensor, one step counter
    assert optimizer_state_bytes(masked) == 2 * mask.num_selected * 4 + 4 == masked.state_bytes()


def powersgd_resumed(rank, world):
    """A resumed PowerSGD sync: its memories and counters come back, and its first two steps are
    plain all-reduces (the new DDP rebuilds its buckets after its first step), then it compresses."""
    torch.manual_seed(0)
    model = nn.Linear(24, 12, bias=False)
    sync = build_comm(comm_cfg("powersgd", rank=1), model, CPU)
    for step in range(4):
        backward(sync, rank, step)
        model.zero_grad()
    sd = sync.state_dict()
    again = build_comm(comm_cfg("powersgd", rank=1), copy.deepcopy(model), CPU)
    again.load_state_dict(sd)
    old, new = sync.tally.psgd, again.tally.psgd
    restored = all(torch.equal(getattr(new, d)[0], getattr(old, d)[0])
                   for d in ("error_dict", "p_memory_dict", "q_memory_dict")) and new.iter == old.iter
    per_step = []
    for step in range(4, 7):
        before = again.bytes_sent
        backward(again, rank, step)
        again.ddp.module.zero_grad()
        per_step.append(again.bytes_sent - before)
    return restored, per_step, again.steps


def test_a_resumed_powersgd_sync_restores_its_memories_then_sends_two_plain_steps():
    for restored, per_step, steps in run_ranks(powersgd_resumed, 2):
        assert restored and steps == 7
        assert per_step == [12 * 24 * 4, 12 * 24 * 4, (12 + 24) * 4]


def powersgd_several_buckets(rank, world):
    model = nn.Linear(1024, 512)  # 2 MiB of gradients
    with pytest.raises(ValueError, match=r"comm\.bucket_cap_mb=1 splits .* several DDP buckets"):
        build_comm(comm_cfg("powersgd", bucket_cap_mb=1), model, CPU)
    return True


def test_powersgd_on_gloo_refuses_several_buckets():
    assert run_ranks(powersgd_several_buckets, 2) == [True, True]
