"""The library on CUDA, each result compared with a CPU reference computed here: packing plans,
the masked optimizers, the Fisher "layers" engine, and the masked all-reduce hook (fp32, fp16 and
bf16 on the wire; NCCL with one process, as on a machine with one GPU; Gloo with CUDA tensors
for two processes; NCCL with two processes where there are two GPUs).

Marked ``gpu`` and skipped, saying why, without CUDA. On a GPU machine:
``benchmarks/gpu_check.sh`` (these tests plus a short NCCL benchmark) or ``pytest -m gpu``.
Nothing here touches CUDA at import time; multi-process tests spawn (CUDA does not survive a
fork) and each rank uses ``cuda:(rank % device_count)``.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from multirank import run_ranks
from reference import assert_scores_match, reference_fisher
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsecomm
from sparsecomm.fisher import fisher_scores
from sparsecomm.packing import build_plan, pack, unpack_

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA device: torch.cuda.is_available() is False on this machine "
                              "(run benchmarks/gpu_check.sh on a GPU machine)"),
]
WIRE = {"fp32": (None, 4), "fp16": (torch.float16, 2), "bf16": (torch.bfloat16, 2)}
# Relative error allowed against the CPU reference: float32 kernels differ in the last bits across
# devices; a narrow wire rounds each value to 11 (fp16) or 8 (bf16) significant bits, once per
# all-reduce summand.
RTOL = {"fp32": 1e-4, "fp16": 2e-3, "bf16": 1.6e-2}
STEPS = 3


def exact_float32() -> None:
    """No TF32 in matmuls or convolutions: the CPU reference computes in true float32."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 5))


def batch(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * step + rank)  # CPU draws: the same batch on any device
    return torch.randn(16, 24, generator=g), torch.randint(0, 5, (16,), generator=g)


def cpu_grads(model: nn.Module, rank: int, step: int) -> dict[str, torch.Tensor]:
    """This rank's local gradient at ``model``'s weights, on a CPU copy, with plain autograd."""
    ref = copy.deepcopy(model).cpu()
    ref.zero_grad(set_to_none=True)  # a copy carries the gradients of the model's last step
    x, y = batch(rank, step)
    nn.functional.cross_entropy(ref(x), y).backward()
    return {n: p.grad.clone() for n, p in ref.named_parameters()}


def close(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str) -> None:
    """``|got - want| <= rtol x max|want|``, entry-wise, with ``got`` brought to the CPU."""
    err = float((got.detach().cpu().double() - want.double()).abs().max())
    scale = float(want.abs().max())
    assert err <= rtol * scale + 1e-12, f"{what}: max |got - want| = {err:.3g}, max |want| = {scale:.3g}"


# ---- packing -------------------------------------------------------------------------------------

def test_packing_plan_on_cuda_gathers_and_scatters_like_boolean_indexing_on_cpu():
    packing_vs_cpu("cuda")


def packing_vs_cpu(dev: str) -> None:
    g = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (13,), (3, 4, 2)]
    cpu_params = [torch.randn(s, generator=g) for s in shapes]
    bits_cpu = [torch.rand(s, generator=g) < 0.3 for s in shapes]
    params = [p.to(dev) for p in cpu_params]
    plan = build_plan(params, {p: b.reshape(-1) for p, b in zip(params, bits_cpu)}, torch.device(dev))
    assert plan.index.device.type == dev and plan.index.dtype == torch.int64
    flat_bits = torch.cat([b.reshape(-1) for b in bits_cpu])
    buffer_cpu = torch.randn(flat_bits.numel(), generator=g)
    assert plan.k == int(flat_bits.sum()) and plan.numel == flat_bits.numel()

    packed = pack(buffer_cpu.to(dev), plan)
    assert packed.device.type == dev and torch.equal(packed.cpu(), buffer_cpu[flat_bits])  # a gather: exact

    values = torch.randn(plan.k, generator=g)
    out = unpack_(torch.zeros(flat_bits.numel(), device=dev), plan, values.to(dev).half())
    want = torch.zeros(flat_bits.numel())
    want[flat_bits] = values.half().float()
    assert torch.equal(out.cpu(), want)


# ---- masked optimizers ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["adamw", "sgd_momentum"])
def test_masked_optimizers_on_cuda_follow_torch_on_cpu_and_leave_the_rest_bit_identical(kind):
    optimizer_vs_cpu("cuda", kind)


def optimizer_vs_cpu(dev: str, kind: str) -> None:
    exact_float32()
    model = mlp().to(dev)
    start = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    mask = sparsecomm.random_mask(model, density=0.2, seed=3)
    if kind == "adamw":
        opt = sparsecomm.MaskedAdamW(model, mask, lr=1e-2, weight_decay=0.1)
        ref_cls, kw = torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)
    else:
        opt = sparsecomm.MaskedSGD(model, mask, lr=1e-1, momentum=0.9, weight_decay=0.01)
        ref_cls, kw = torch.optim.SGD, dict(lr=1e-1, momentum=0.9, weight_decay=0.01)
    assert all(t.device.type == dev for t in opt.param_groups[0]["params"])
    # The reference: torch's stock optimizer on the CPU, over the selected entries only.
    selected = {n: nn.Parameter(start[n][mask[n]].clone()) for n in start}
    ref_opt = ref_cls(list(selected.values()), **kw)
    for step in range(STEPS):
        g = torch.Generator().manual_seed(step)
        grads = {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            p.grad = grads[n].to(dev)
            selected[n].grad = grads[n][mask[n]].clone()
        opt.step()
        ref_opt.step()
    for n, p in model.named_parameters():
        got = p.detach().cpu()
        assert torch.equal(got[~mask[n]], start[n][~mask[n]]), f"{n}: an unselected entry moved"
        close(got[mask[n]], selected[n].detach(), 1e-5, n)
    assert any(t.device.type == dev for st in opt.state.values() for t in st.values() if torch.is_tensor(t) and t.dim())


# ---- Fisher, the layers engine -------------------------------------------------------------------

class Tokens(nn.Module):
    """An embedding, LayerNorm, a per-token Linear, mean pooling: the layers engine's kinds on CUDA."""

    def __init__(self):
        super().__init__()
        self.words = nn.Embedding(17, 8, padding_idx=0)
        self.ln = nn.LayerNorm(8)
        self.tok = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids):
        h = torch.tanh(self.tok(self.ln(self.words(input_ids))))
        return self.head(h.mean(1))


class Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


@pytest.mark.parametrize("kind", ["conv", "tokens"])
def test_fisher_layers_engine_on_cuda_equals_the_cpu_per_example_loop(kind):
    fisher_vs_cpu("cuda", kind)


def fisher_vs_cpu(dev: str, kind: str) -> None:
    exact_float32()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if kind == "conv":
        model = Conv()
        model.bn.running_mean.uniform_(-0.2, 0.2)
        x = torch.randn(12, 1, 8, 8, generator=g)
    else:
        model = Tokens()
        x = torch.randint(0, 17, (12, 6), generator=g)
    y = torch.randint(0, 3, (12,), generator=g)
    want = reference_fisher(model, [(x[:7], y[:7]), (x[7:], y[7:])], nn.functional.cross_entropy)  # CPU
    cuda_model = copy.deepcopy(model).to(dev)
    stats = {}
    got, seen = fisher_scores(cuda_model, [(x[:7].to(dev), y[:7].to(dev)), (x[7:].to(dev), y[7:].to(dev))],
                              nn.functional.cross_entropy, num_samples=12, chunk_size=5, engine="layers",
                              stats=stats)
    assert seen == 12 and stats == {"engine": "layers"}
    assert all(s.device.type == dev and s.dtype == torch.float32 for s in got.values())
    assert_scores_match({n: s.cpu() for n, s in got.items()}, want, rtol=1e-4, floor=1e-7)
    # The mask from CUDA scores: the global top-k of the CPU reference, but for near-ties.
    mask = sparsecomm.fisher_mask(cuda_model, [(x.to(dev), y.to(dev))], nn.functional.cross_entropy, density=0.1,
                                  num_samples=12)
    flat_want = torch.cat([want[n].reshape(-1) for n, _ in model.named_parameters()])
    top = torch.zeros_like(flat_want, dtype=torch.bool)
    top[torch.topk(flat_want, mask.num_selected).indices] = True
    got_bits = torch.cat([mask[n].reshape(-1) for n, _ in model.named_parameters()])
    assert mask.num_selected == round(0.1 * flat_want.numel())
    assert int((got_bits & top).sum()) >= mask.num_selected - 2, "the CUDA mask is not the reference top-k"


# ---- the masked all-reduce hook ------------------------------------------------------------------

def hook_vs_cpu(rank: int, world: int, wire: str, fused: bool, dense_at: int | None = None,
                dev: str = "cuda") -> dict:
    """DDP on this rank's CUDA device with the masked hook; per step, the reduced gradient against
    the mean of every rank's local gradient computed on the CPU (masked, wire rounding allowed)."""
    exact_float32()
    device = torch.device("cuda", torch.cuda.current_device()) if dev == "cuda" else torch.device(dev)
    model = mlp().to(device)
    mask = sparsecomm.random_mask(model, density=0.3, seed=5)
    ddp = DDP(model, device_ids=[device.index] if dev == "cuda" else None, bucket_cap_mb=0.005)  # several buckets
    wire_dtype, wire_bytes = WIRE[wire]
    state = sparsecomm.register_masked_allreduce(ddp, mask, wire_dtype=wire_dtype, fused=fused)
    opt = sparsecomm.MaskedSGD(model, mask, lr=0.1)
    frozen = {n: p.detach().cpu()[~mask[n]].clone() for n, p in model.named_parameters()}
    sent = []
    for step in range(STEPS):
        state.dense = step == dense_at
        per_rank = [cpu_grads(model, r, step) for r in range(world)]
        opt.zero_grad(set_to_none=False)
        before = state.bytes_sent
        x, y = batch(rank, step)
        nn.functional.cross_entropy(ddp(x.to(device)), y.to(device)).backward()
        sent.append(state.bytes_sent - before)
        for n, p in model.named_parameters():
            assert p.grad.device == device
            want = sum(g[n] for g in per_rank) / world
            if not state.dense:
                want = want * mask[n]
                assert not p.grad.cpu()[~mask[n]].any(), f"step {step} {n}: an unselected entry is not zero"
            close(p.grad, want, RTOL[wire], f"step {step} {n} ({wire})")
        if not state.dense:
            opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach().cpu()[~mask[n]], frozen[n]), f"{n}: an unselected weight moved"
    n = sum(p.numel() for p in model.parameters())
    return {"sent": sent, "k": mask.num_selected, "n": n, "wire_bytes": wire_bytes, "plans": state.num_plans,
            "params": [p.detach().cpu() for p in model.parameters()], "backend": dist.get_backend()}


def check_hook_results(results: list[dict], dense_at: int | None = None) -> None:
    for r in results:
        assert r["plans"] > 1, "the test must exercise several buckets"
        for step, sent in enumerate(r["sent"]):
            # dense steps send the whole bucket in the wire dtype too (average-then-cast)
            want = (r["n"] if step == dense_at else r["k"]) * r["wire_bytes"]
            assert sent == want, f"step {step}: {sent} bytes handed to all-reduce, expected {want}"
    for r in results[1:]:  # every rank holds the very same weights
        assert all(torch.equal(a, b) for a, b in zip(r["params"], results[0]["params"]))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "per_bucket"])
@pytest.mark.parametrize("wire", ["fp32", "fp16", "bf16"])
def test_hook_nccl_one_process(wire, fused):
    """NCCL with world size 1, as on a machine with one GPU: the hook's CUDA path end to end."""
    results = run_ranks(hook_vs_cpu, 1, wire, fused, 1, backend="nccl", start_method="spawn", cuda=True,
                        timeout=300)
    assert results[0]["backend"] == "nccl"
    check_hook_results(results, dense_at=1)


@pytest.mark.parametrize("wire", ["fp32", "fp16"])
def test_hook_gloo_cuda_tensors_two_processes(wire):
    """Gloo all-reducing CUDA tensors between 2 processes (both may share one GPU)."""
    results = run_ranks(hook_vs_cpu, 2, wire, True, 2, backend="gloo", start_method="spawn", cuda=True,
                        timeout=300)
    check_hook_results(results, dense_at=2)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason=f"NCCL between 2 processes needs 2 GPUs (this machine has {torch.cuda.device_count()})")
@pytest.mark.parametrize("wire", ["fp32", "bf16"])
def test_hook_nccl_two_processes(wire):
    results = run_ranks(hook_vs_cpu, 2, wire, True, None, backend="nccl", start_method="spawn", cuda=True,
                        timeout=300)
    check_hook_results(results)
