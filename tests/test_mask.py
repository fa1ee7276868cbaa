
import pytest
import torch
from torch import nn

import sparsecomm
from sparsecomm.mask import Mask, MaskMismatch, count_for_density, topk_mask


def net(out=5):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, out))


def test_digest_is_stable_and_content_sensitive():
    m = sparsecomm.random_mask(net(), density=0.2, seed=1)
    same = Mask({n: b.clone() for n, b in m.items()})
    assert m.digest() == same.digest()
    flipped = {n: b.clone() for n, b in m.items()}
    flipped["0.weight"][0, 0] ^= True
    assert Mask(flipped).digest() != m.digest()
    # insertion order does not matter, the bits do
    assert Mask(dict(reversed(list(m.items())))).digest() == m.digest()


def test_random_mask_counts_and_seed():
    model = net()
    n = sum(p.numel() for p in model.parameters())
    m = sparsecomm.random_mask(model, density=0.25, seed=3)
    assert m.num_selected == round(0.25 * n) and m.numel == n
    assert sparsecomm.random_mask(model, density=0.25, seed=3).digest() == m.digest()
    assert sparsecomm.random_mask(model, density=0.25, seed=4).digest() != m.digest()


def test_always_patterns_kept_whole_and_counted():
    model = net()
    n = sum(p.numel() for p in model.parameters())
    m = sparsecomm.random_mask(model, density=0.5, seed=0, always=["2.*"])
    assert m["2.weight"].all() and m["2.bias"].all()
    assert m.num_selected == round(0.5 * n)
    with pytest.raises(ValueError, match="raise the density"):
        sparsecomm.random_mask(model, density=0.01, always=["2.*"])


def test_topk_ties_are_deterministic_and_exact():
    scores = {"a": torch.ones(10), "b": torch.ones(3, 3)}
    m = topk_mask(scores, 7)
    assert m.num_selected == 7
    assert m["a"][:7].all() and not m["a"][7:].any() and not m["b"].any()


@pytest.mark.parametrize("density,msg", [(0, "outside \\(0, 1\\]"), (1.5, "outside"), (-0.1, "outside"),
                                         ("abc", "not a number"), (1e-9, "selects no entry")])
def test_bad_density(density, msg):
    with pytest.raises(ValueError, match=msg) as e:
        count_for_density(density, 1000, field="mask.density")
    assert "mask.density" in str(e.value)


def test_save_load_roundtrip_and_corruption(tmp_path):
    model = net()
    m = sparsecomm.random_mask(model, density=0.2, seed=1)
    p = tmp_path / "mask.safetensors"
    assert m.save(p) == m.digest()
    assert Mask.load(p, model).digest() == m.digest()
    raw = bytearray(p.read_bytes())
    raw[-1] = 0 if raw[-1] else 1  # flip the last stored bit
    p.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="corrupted"):
        Mask.load(p)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Mask.load(tmp_path / "nope.safetensors")


def test_mask_for_another_model_names_first_mismatch(tmp_path):
    m = sparsecomm.random_mask(net(5), density=0.2)
    with pytest.raises(MaskMismatch, match=r"'2.weight' has shape \(3, 16\) in the model but \(5, 16\)"):
        m.validate(net(3))
    other = nn.Sequential(nn.Linear(8, 16))
    with pytest.raises(MaskMismatch, match="not a parameter of the model"):
        m.validate(other)
    path = tmp_path / "m.safetensors"
    m.save(path)
    with pytest.raises(MaskMismatch, match="another model"):
        Mask.load(path, net(3))
