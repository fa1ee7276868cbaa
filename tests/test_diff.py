"""Tasks as sparse diffs: bit-exact save/apply round-trips for several tasks on one base,
refusal of a wrong base and of a lossy save, and the stored size against the full model."""
import copy
import hashlib

import pytest
import torch
from safetensors import safe_open

import sparsecomm
import sparsecomm.diff as sdiff
from sparsecomm.app.models import small_cnn


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_bit_identical(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and sa[name].shape == sb[name].shape, name
        assert _bits(sa[name]) == _bits(sb[name]), name


def varint_gaps(positions: list[int]) -> list[int]:
    """The reference encoding, written out byte by byte: LEB128 of the first position, then of
    each ``position - previous - 1``."""
    out, prev = [], -1
    for p in positions:
        g = p - prev - 1
        prev = p
        while True:
            low, g = g & 0x7F, g >> 7
            out.append(low | (0x80 if g else 0))
            if not g:
                break
    return out


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return small_cnn(10)


def finetune(base, seed, density=0.01, steps=3):
    """A task model: masked SGD-with-momentum steps on random digits (BatchNorm stats change too)."""
    model = copy.deepcopy(base)
    mask = sparsecomm.random_mask(model, density=density, seed=seed, always=["head.*"])
    opt = sparsecomm.MaskedSGD(model, mask, lr=0.5, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        x, y = torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, mask


def test_several_tasks_round_trip_bit_exactly_on_one_base(base, tmp_path):
    base_bytes = {n: _bits(t) for n, t in base.state_dict().items()}
    tasks = {}
    for seed in range(3):
        model, mask = finetune(base, seed)
        path = tmp_path / f"task{seed}.diff.safetensors"
        meta = sdiff.save(model, base, mask, path)
        assert meta["mask_digest"] == mask.digest()
        tasks[seed] = (model, path)
    for seed, (model, path) in tasks.items():
        rebuilt = sdiff.apply(base, path)
        assert rebuilt is not base and type(rebuilt) is type(base)
        assert_bit_identical(rebuilt, model)
        # the shared base is untouched, so the next task applies to it too
        assert {n: _bits(t) for n, t in base.state_dict().items()} == base_bytes
    # the tasks really differ from each other and from the base
    m0, m1 = tasks[0][0], tasks[1][0]
    assert not torch.equal(m0.head.weight, m1.head.weight) and not torch.equal(m0.head.weight, base.head.weight)


def test_file_holds_only_the_selected_entries_and_the_base_hash(base, tmp_path):
    model, mask = finetune(base, 7)
    path = tmp_path / "t.safetensors"
    sdiff.save(model, base, mask, path)
    with safe_open(str(path), framework="pt") as f:
        meta, keys = f.metadata(), list(f.keys())
        for name in dict(base.named_parameters()):
            idx = mask.flat_indices(name)
            if idx.numel():
                gaps = f.get_tensor(f"{name}::gaps")
                assert gaps.dtype == torch.uint8 and gaps.tolist() == varint_gaps(idx.tolist())
                assert torch.equal(f.get_tensor(f"{name}::values"),
                                   dict(model.named_parameters())[name].detach().reshape(-1)[idx])
    # an independent hash of the base: SHA-256 over sorted params then persistent buffers
    h = hashlib.sha256()
    sd = base.state_dict()
    params = dict(base.named_parameters())
    for kind, names in (("param", sorted(params)), ("buffer", sorted(set(sd) - set(params)))):
        for n in names:
            t = sd[n]
            h.update(f"{kind}:{n}:{t.dtype}:{list(t.shape)}\n".encode())
            h.update(_bits(t))
    assert meta["base_sha256"] == h.hexdigest() == sdiff.base_hash(base)
    assert meta["format"] == sdiff.DIFF_FORMAT and meta["mask_digest"] == mask.digest()
    assert any(k.endswith("::buffer") for k in keys)  # BatchNorm statistics changed in training


def test_refuses_a_different_base(base, tmp_path):
    model, mask = finetune(base, 1)
    path = tmp_path / "t.safetensors"
    sdiff.save(model, base, mask, path)
    torch.manual_seed(123)
    other = small_cnn(10)
    with pytest.raises(sdiff.BaseMismatch) as e:
        sdiff.apply(other, path)
    msg = str(e.value)
    assert sdiff.base_hash(base) in msg and sdiff.base_hash(other) in msg
    # a base patched in place by another task's diff no longer matches either
    patched = sdiff.apply(copy.deepcopy(base), path, inplace=True)
    with pytest.raises(sdiff.BaseMismatch, match="inplace=True"):
        sdiff.apply(patched, path)
    # one flipped bit in one weight is another base
    nudged = copy.deepcopy(base)
    with torch.no_grad():
        nudged.head.bias.view(torch.int32)[0] ^= 1
    with pytest.raises(sdiff.BaseMismatch):
        sdiff.apply(nudged, path)


def test_inplace_apply_returns_the_base_itself(base, tmp_path):
    model, mask = finetune(base, 2)
    path = tmp_path / "t.safetensors"
    sdiff.save(model, base, mask, path)
    target = copy.deepcopy(base)
    out = sdiff.apply(target, path, inplace=True)
    assert out is target
    assert_bit_identical(out, model)


def test_refuses_a_lossy_save(base, tmp_path):
    model, mask = finetune(base, 3)
    outside = (~mask["fc.0.weight"]).reshape(-1).nonzero()[5].item()
    with torch.no_grad():
        model.fc[0].weight.view(-1)[outside] += 1e-3
    with pytest.raises(sdiff.LossyDiff, match=r"'fc\.0\.weight'.*1 entries outside the mask.*"
                                              rf"flat index {outside}"):
        sdiff.save(model, base, mask, tmp_path / "t.safetensors")
    assert not (tmp_path / "t.safetensors").exists()
    # the sign of zero counts: -0.0 where the base has 0.0 would not rebuild bit-exactly
    zero_base = copy.deepcopy(base)
    i = (~mask["fc.0.bias"]).nonzero()[0].item()
    with torch.no_grad():
        zero_base.fc[0].bias[i] = 0.0
        tuned = copy.deepcopy(zero_base)
        tuned.fc[0].bias[i] = -0.0
    assert torch.equal(tuned.fc[0].bias, zero_base.fc[0].bias)  # equal as numbers...
    with pytest.raises(sdiff.LossyDiff, match="fc.0.bias"):     # ...not as bits
        sdiff.save(tuned, zero_base, mask, tmp_path / "t.safetensors")


def test_size_is_far_below_the_full_model(base, tmp_path):
    model, mask = finetune(base, 4, density=0.01)
    path = tmp_path / "t.safetensors"
    sdiff.save(model, base, mask, path)
    rep = sdiff.size_report(path)
    k = mask.num_selected
    n = sum(p.numel() for p in base.parameters())
    assert rep["num_selected"] == k and rep["numel"] == n
    positions = [mask.flat_indices(name).tolist() for name in dict(base.named_parameters())]
    assert rep["index_bytes"] == sum(len(varint_gaps(p)) for p in positions) < 2.5 * k
    assert rep["value_bytes"] == 4 * k
    full = sum(t.numel() * t.element_size() for t in base.state_dict().values())
    assert rep["full_model_bytes"] == full
    assert rep["file_bytes"] == path.stat().st_size
    assert rep["file_bytes"] < 0.1 * full and rep["ratio"] == pytest.approx(rep["file_bytes"] / full)


def test_unchanged_model_and_bad_inputs(base, tmp_path):
    mask = sparsecomm.random_mask(base, density=0.01, seed=0)
    path = tmp_path / "same.safetensors"
    sdiff.save(copy.deepcopy(base), base, mask, path)   # a no-op task is a valid diff
    assert_bit_identical(sdiff.apply(base, path), base)
    with pytest.raises(FileNotFoundError, match="sparsecomm.diff.save"):
        sdiff.apply(base, tmp_path / "missing.safetensors")
    other_arch = small_cnn(5)
    with pytest.raises(ValueError, match="head.weight"):
        sdiff.save(other_arch, base, mask, tmp_path / "x.safetensors")
    mask.save(tmp_path / "mask.safetensors")
    with pytest.raises(ValueError, match="not a sparsecomm diff file"):
        sdiff.apply(base, tmp_path / "mask.safetensors")
