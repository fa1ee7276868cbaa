"""sparsecomm.integrations.lightning: Lightning's Trainer with SparseCommStrategy and the masked
optimizer from configure_optimizers keeps the core contract on 2 Gloo ranks (tests/stack_contract.py),
on CPU, where Lightning's own comm-hook registration does nothing."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("lightning")

import lightning.pytorch as pl  # noqa: E402
from multirank import run_ranks  # noqa: E402
from stack_contract import WireTap, assert_contract, facts, snapshot  # noqa: E402
from update_reference import assert_params_close, masked_sgd_reference  # noqa: E402

from sparsecomm.fisher import fisher_mask  # noqa: E402
from sparsecomm.integrations.lightning import SparseCommStrategy, masked_optimizer  # noqa: E402
from sparsecomm.mask import random_mask  # noqa: E402
from sparsecomm.optim import MaskedSGD  # noqa: E402

pytestmark = pytest.mark.slow  # 2-rank Lightning runs


def data(seed: int, n: int = 64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long())


SGD_LR = 0.5


class Tiny(pl.LightningModule):
    def __init__(self, optimizer: str = "adamw"):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
        self.optimizer_name = optimizer

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        if self.optimizer_name == "plain_sgd":
            return masked_optimizer(self, MaskedSGD, lr=SGD_LR)
        if self.optimizer_name == "sgd":
            return masked_optimizer(self, MaskedSGD, lr=0.1, momentum=0.9)
        return masked_optimizer(self, lr=1e-2)


def fisher_on_own_shard(module):
    rank = torch.distributed.get_rank()
    batches = torch.utils.data.DataLoader(data(20 + rank, 16), batch_size=8)
    return fisher_mask(module, batches, F.cross_entropy, density=0.05, num_samples=32, always=["net.4.bias"])


def train_rank(rank, world, root, mask_kind, optimizer, accumulation, steps):
    # what torchrun sets: Lightning then joins (the process group is already up) instead of launching
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), NODE_RANK="0",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    module = Tiny(optimizer)
    before = snapshot(module)
    mask = fisher_on_own_shard if mask_kind == "fisher" else random_mask(module, density=0.05, seed=3)
    strategy = SparseCommStrategy(mask, process_group_backend="gloo")
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_steps=steps,
                         accumulate_grad_batches=accumulation, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    with WireTap() as tap:
        trainer.fit(module, torch.utils.data.DataLoader(data(7), batch_size=8))
    return facts(module, before, strategy.mask, strategy.comm_state, trainer.optimizers[0], tap)


@pytest.mark.parametrize("mask_kind,optimizer,accumulation,state_per_entry",
                         [("fisher", "adamw", 2, 2), ("random", "sgd", 1, 1)])
def test_strategy_sends_k_values_per_step_and_freezes_the_rest(tmp_path, mask_kind, optimizer, accumulation,
                                                               state_per_entry):
    steps = 3
    results = run_ranks(train_rank, 2, str(tmp_path), mask_kind, optimizer, accumulation, steps, timeout=180)
    numbers = assert_contract(results, steps=steps, state_per_entry=state_per_entry)
    assert numbers["bytes_per_step"] == 4 * numbers["k"] < numbers["dense_bytes_per_step"]


def test_refusals_name_the_fix():
    with pytest.raises(ValueError, match="sets ddp_comm_hook and ddp_comm_state itself"):
        SparseCommStrategy(random_mask(Tiny(), density=0.1), ddp_comm_hook=print)
    with pytest.raises(TypeError, match="mask must be a sparsecomm.Mask or a function"):
        SparseCommStrategy(0.1)
    with pytest.raises(AssertionError, match="ValueError: Trainer.gradient_clip_val=1.0. would clip"):
        run_ranks(fit_with_clipping, 1)  # in a child: Lightning's set-up joins a process group


def fit_with_clipping(rank, world):
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", NODE_RANK="0")
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=SparseCommStrategy(lambda m: None),
                         gradient_clip_val=1.0, logger=False, enable_progress_bar=False, max_steps=1)
    trainer.fit(Tiny(), torch.utils.data.DataLoader(data(1, 8), batch_size=8))


class Recorded(Tiny):
    """Records the micro-batches this rank trains on; ``stock_mask``: plain ``torch.optim.SGD`` under
    stock DDP with the gradient multiplied by that mask before each optimizer step."""

    def __init__(self, stock_mask=None):
        super().__init__("plain_sgd")
        self.seen, self.stock_mask = [], stock_mask

    def training_step(self, batch, batch_idx):
        self.seen.append([t.clone() for t in batch])
        return super().training_step(batch, batch_idx)

    def on_before_optimizer_step(self, optimizer):
        if self.stock_mask is not None:
            for name, p in self.named_parameters():
                p.grad.mul_(self.stock_mask[name])

    def configure_optimizers(self):
        if self.stock_mask is not None:
            return torch.optim.SGD(self.parameters(), lr=SGD_LR)
        return super().configure_optimizers()


def sgd_rank(rank, world, root, integration, accumulation, steps):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), NODE_RANK="0",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    mask = random_mask(Tiny(), density=0.2, seed=3)
    if integration == "sparsecomm":
        module, strategy = Recorded(), SparseCommStrategy(mask, process_group_backend="gloo")
    else:
        module = Recorded({name: mask[name] for name, _ in Tiny().named_parameters()})
        strategy = pl.strategies.DDPStrategy(process_group_backend="gloo")
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_steps=steps,
                         accumulate_grad_batches=accumulation, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    trainer.fit(module, torch.utils.data.DataLoader(data(7), batch_size=8))
    return snapshot(module), module.seen, {name: mask[name].clone() for name, _ in module.named_parameters()}


@pytest.mark.parametrize("accumulation", [1, 2])
def test_masked_sgd_update_is_the_rank_mean_gradient_on_the_mask(tmp_path, accumulation):
    """Lightning divides the loss by accumulate_grad_batches; DDP (and the hook) averages over ranks.
    The update equals (a) stock DDPStrategy + SGD with the gradient masked before the step and (b) the
    mean over ranks and micro-batches of plain-autograd gradients on the mask (tests/update_reference.py)."""
    steps, world = 3, 2
    ours = run_ranks(sgd_rank, world, str(tmp_path), "sparsecomm", accumulation, steps, timeout=180)
    stock = run_ranks(sgd_rank, world, str(tmp_path), "stock", accumulation, steps, timeout=180)
    mask = ours[0][2]
    seen = [r[1] for r in ours]
    assert all(len(s) == steps * accumulation for s in seen)
    plan = [[seen[r][s * accumulation:(s + 1) * accumulation] for r in range(world)] for s in range(steps)]
    before = snapshot(Tiny())
    want, _ = masked_sgd_reference(Tiny(), plan, lambda m, b: F.cross_entropy(m(b[0]), b[1]), mask, SGD_LR)
    assert not torch.equal(seen[0][0][0], seen[1][0][0])  # the ranks trained on different batches
    for params, _, _ in ours + stock:
        assert_params_close(params, want, before)


def fisher_mask_rank(rank, world, root, own_head):
    """The mask SparseCommStrategy builds from a Fisher function; ``own_head``: every rank but 0
    re-initialises the last layer its own way."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), NODE_RANK="0",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    module = Tiny()
    if own_head and rank > 0:
        torch.manual_seed(100 + rank)
        module.net[4].reset_parameters()
    strategy = SparseCommStrategy(fisher_on_own_shard, process_group_backend="gloo")
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_steps=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=root)
    trainer.fit(module, torch.utils.data.DataLoader(data(7), batch_size=8))
    return strategy.mask.digest()


def test_mask_function_scores_rank0_weights_when_ranks_initialised_apart(tmp_path):
    """Reference: the same run with every rank holding rank 0's weights from the start."""
    apart = run_ranks(fisher_mask_rank, 2, str(tmp_path), True, timeout=120)
    same = run_ranks(fisher_mask_rank, 2, str(tmp_path), False, timeout=120)
    assert apart == same and len(set(same)) == 1
