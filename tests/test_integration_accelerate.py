"""sparsecomm.integrations.accelerate: after accelerator.prepare, prepare_masked keeps the core
contract on 2 Gloo ranks (tests/stack_contract.py), gradient accumulation included."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

pytest.importorskip("accelerate")

from accelerate import Accelerator  # noqa: E402
from multirank import run_ranks  # noqa: E402
from stack_contract import (WireTap, assert_contract, facts, fresh_accelerate_state,  # noqa: E402,F401 (fixture)
                            snapshot)
from update_reference import assert_params_close, masked_sgd_reference  # noqa: E402

from sparsecomm.fisher import fisher_mask  # noqa: E402
from sparsecomm.integrations.accelerate import prepare_masked  # noqa: E402
from sparsecomm.mask import random_mask  # noqa: E402

pytestmark = pytest.mark.slow  # 2-rank Accelerate runs


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def data(rank: int, n: int = 64):
    g = torch.Generator().manual_seed(10 + rank)  # each rank its own shard
    x = torch.randn(n, 8, generator=g)
    return torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long())


def train_rank(rank, world, optimizer_name, mask_kind, accumulation, batches, precision):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29500", OMP_NUM_THREADS="1")
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation, mixed_precision=precision)
    model = tiny_mlp()
    before = snapshot(model)
    loader = torch.utils.data.DataLoader(data(rank), batch_size=8)
    model = accelerator.prepare(model)  # the loader stays this rank's own shard
    loss_fn = nn.CrossEntropyLoss()
    if mask_kind == "fisher":
        mask = fisher_mask(model, loader, loss_fn, density=0.05, num_samples=32, always=["4.bias"])
    else:
        mask = random_mask(model, density=0.05, seed=3)
    stock = (torch.optim.AdamW(model.parameters(), lr=1e-2) if optimizer_name == "adamw"
             else torch.optim.SGD(model.parameters(), lr=1e-1, momentum=0.9))
    optimizer, comm = prepare_masked(accelerator, model, accelerator.prepare(stock), mask)
    assert type(optimizer).__name__ == "AcceleratedOptimizer" and accelerator._optimizers == [optimizer]
    with WireTap() as tap:
        for i, (x, y) in enumerate(loader):
            if i == batches:
                break
            with accelerator.accumulate(model):
                accelerator.backward(loss_fn(model(x), y))
                optimizer.step()
                optimizer.zero_grad()
    return facts(accelerator.unwrap_model(model), before, mask, comm, optimizer, tap)


@pytest.mark.parametrize("optimizer_name,mask_kind,accumulation,precision,state_per_entry",
                         [("adamw", "fisher", 2, "no", 2), ("sgd", "random", 1, "no", 1),
                          ("adamw", "random", 1, "bf16", 2)])
def test_prepared_model_sends_k_values_per_step_and_freezes_the_rest(optimizer_name, mask_kind, accumulation,
                                                                     precision, state_per_entry):
    """bf16 autocast: the forward runs in bf16, the gradients (and the wire) stay in the parameters' fp32."""
    batches = 6
    results = run_ranks(train_rank, 2, optimizer_name, mask_kind, accumulation, batches, precision, timeout=180)
    numbers = assert_contract(results, steps=batches // accumulation, state_per_entry=state_per_entry)
    assert numbers["bytes_per_step"] == 4 * numbers["k"] < numbers["dense_bytes_per_step"]


def test_refusals_name_the_fix():
    from sparsecomm.integrations.common import masked_counterpart

    model = tiny_mlp()
    mask = random_mask(model, density=0.1)
    with pytest.raises(TypeError, match="not Adam; build the optimizer"):
        masked_counterpart(torch.optim.Adam(model.parameters()), model, mask)
    groups = [{"params": [model[0].weight], "lr": 1e-3}, {"params": [model[0].bias], "lr": 1e-2}]
    with pytest.raises(ValueError, match=r"groups differ in \['lr'\]"):
        masked_counterpart(torch.optim.AdamW(groups), model, mask)
    accelerator = Accelerator(cpu=True)
    optimizer, comm = prepare_masked(accelerator, model, torch.optim.AdamW(model.parameters(), lr=0.5), mask)
    assert comm is None and optimizer.optimizer.param_groups[0]["lr"] == 0.5  # one process: nothing to send


def sgd_rank(rank, world, integration, accumulation, batches, lr, fused=True):
    """``batches`` micro-batches of plain SGD on this rank's shard: through prepare_masked
    (``integration="sparsecomm"``) or through stock DDP with the gradient multiplied by the mask
    before each step (``"stock"``). Returns the trained parameters and the mask."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29500", OMP_NUM_THREADS="1")
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    model = accelerator.prepare(tiny_mlp())
    module = accelerator.unwrap_model(model)
    mask = random_mask(module, density=0.2, seed=3)
    optimizer = accelerator.prepare(torch.optim.SGD(model.parameters(), lr=lr))
    if integration == "sparsecomm":
        optimizer, _ = prepare_masked(accelerator, model, optimizer, mask, fused=fused)
    loss_fn = nn.CrossEntropyLoss()
    for i, (x, y) in enumerate(torch.utils.data.DataLoader(data(rank), batch_size=8)):
        if i == batches:
            break
        with accelerator.accumulate(model):
            accelerator.backward(loss_fn(model(x), y))
            if integration == "stock" and accelerator.sync_gradients:
                for name, p in module.named_parameters():
                    p.grad.mul_(mask[name])
            optimizer.step()
            optimizer.zero_grad()
    return snapshot(module), {name: mask[name].clone() for name, _ in module.named_parameters()}


@pytest.mark.parametrize("accumulation,fused", [(1, True), (3, True), (3, False)])
def test_masked_sgd_update_is_the_rank_mean_gradient_on_the_mask(accumulation, fused):
    """The update equals (a) stock DDP + SGD with the gradient masked afterwards and (b) the mean over
    ranks and micro-batches of plain-autograd gradients on the mask (tests/update_reference.py):
    no world-size or accumulation factor, with one all-reduce per step (fused) or one per DDP bucket."""
    batches, lr, world = 6, 0.5, 2
    ours = run_ranks(sgd_rank, world, "sparsecomm", accumulation, batches, lr, fused, timeout=180)
    stock = run_ranks(sgd_rank, world, "stock", accumulation, batches, lr, timeout=180)
    mask = ours[0][1]
    shards = [list(torch.utils.data.DataLoader(data(r), batch_size=8))[:batches] for r in range(world)]
    steps = [[shards[r][s * accumulation:(s + 1) * accumulation] for r in range(world)]
             for s in range(batches // accumulation)]
    before = snapshot(tiny_mlp())
    want, _ = masked_sgd_reference(tiny_mlp(), steps, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), mask, lr)
    for params, _ in ours:
        assert_params_close(params, want, before)
    for params, _ in stock:
        assert_params_close(params, want, before)
