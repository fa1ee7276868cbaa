"""Core/full alternation on the hook side, 2 Gloo ranks: a width core as the mask, the
schedule's pattern ("3:1") or probability deciding ``state.dense`` per step with no
re-registration. Checked per step against an independent reference: the bytes handed to
all-reduce (k x 4 on core steps, n x 4 on full steps), the reduced gradient (every rank
recomputes both ranks' local gradients on a plain copy and averages them itself), and the
update (core steps leave every non-core entry bit-identical; full steps move them)."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsecomm
from multirank import run_ranks
from sparsecomm.app.models import mlp
from sparsecomm.app.schedule import Schedule
from sparsecomm.width_core import width_core_mask

STEPS = 8


@pytest.fixture(scope="module", autouse=True)
def _import_lazily_loaded_modules_before_fork():
    """The first optimizer / DDP in a process imports torch._dynamo (seconds on a busy machine);
    doing it once here lets the forked ranks inherit it instead of each paying for it."""
    torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)


def make_model():
    torch.manual_seed(0)
    return mlp(in_features=16, hidden=32, depth=2, num_classes=5)


def batch(rank, step):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(8, 16, generator=g), torch.randint(0, 5, (8,), generator=g)


def local_grads(model, rank, step):
    model.zero_grad(set_to_none=False)
    x, y = batch(rank, step)
    nn.functional.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def core_full_run(rank, world, spec, dense_steps):
    model = make_model()
    mask = width_core_mask(model, 0.5)
    ddp = DDP(model, bucket_cap_mb=0.005)  # ~5 KB buckets: several per step
    state = sparsecomm.register_masked_allreduce(ddp, mask)
    sched = Schedule.from_config({"name": "core_full", "dense_steps": dense_steps, "core_full": spec},
                                 steps=STEPS, seed=3)
    masked_opt = sparsecomm.MaskedSGD(model, mask, lr=0.1)
    dense_opt = torch.optim.SGD(model.parameters(), lr=0.1)
    params = dict(model.named_parameters())
    log = []
    for step in range(STEPS):
        full = sched.sends_dense(step)
        state.dense = full                      # the only switch: no re-registration
        ref = copy.deepcopy(model)              # plain copy at this step's weights
        per_rank = [local_grads(ref, r, step) for r in range(world)]
        opt = dense_opt if full else masked_opt
        opt.zero_grad(set_to_none=False)
        before = state.bytes_sent
        x, y = batch(rank, step)
        nn.functional.cross_entropy(ddp(x), y).backward()
        sent = state.bytes_sent - before
        for n, p in params.items():
            expected = sum(g[n] for g in per_rank) / world
            if not full:
                expected = expected * mask[n]
                assert torch.count_nonzero(p.grad[~mask[n]]) == 0, f"step {step} {n}: non-core gradient"
            torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-7)
        noncore = {n: p.detach()[~mask[n]].clone() for n, p in params.items()}
        opt.step()
        moved = sum(int((p.detach()[~mask[n]] != noncore[n]).sum()) for n, p in params.items())
        log.append((full, sent, moved))
    n = sum(p.numel() for p in model.parameters())
    return log, n, mask.num_selected, state.steps


def check(results, expected_full):
    logs = [r[0] for r in results]
    assert logs[0] == logs[1]  # every rank took the same decisions and sent the same bytes
    for log, n, k, steps in results:
        assert steps == STEPS and 0 < k < n
        assert [full for full, _, _ in log] == expected_full
        for step, (full, sent, moved) in enumerate(log):
            assert sent == (n if full else k) * 4, f"step {step}: sent {sent} bytes, full={full}"
            if full:
                assert moved > 0, f"step {step}: a full step left the non-core weights alone"
            else:
                assert moved == 0, f"step {step}: a core step changed {moved} non-core entries"


@pytest.mark.slow  # a 2-rank run of every phase: 6 s
def test_pattern_3_to_1_switches_bytes_per_step():
    results = run_ranks(core_full_run, 2, "3:1", 0)
    check(results, [False, False, False, True] * 2)


def test_pattern_after_dense_warmup_and_by_probability():
    # 2 dense warm-up steps (dense), then the "1:1" cycle counted from the first sparse step
    results = run_ranks(core_full_run, 2, "1:1", 2)
    check(results, [True, True, False, True, False, True, False, True])
    # probability: every rank draws the same per-step decision from (seed, step). Expected, written
    # down once (not asked of the schedule): sparse step s is full when
    # random.Random(seed * 1_000_003 + s).random() < p, here seed 3, p 0.5.
    expected = [True, False, False, False, False, True, False, True]
    check(run_ranks(core_full_run, 2, 0.5, 0), expected)
