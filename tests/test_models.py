"""sparsecomm.app.models: output shapes, parameter counts of the named sizes, heads, GPT-2 causality."""
import fnmatch

import pytest
import torch

from sparsecomm.app import models


def count(build, **kw):
    with torch.device("meta"):  # no memory, no init time: counts only
        return models.num_params(build(**kw))


def head_numel(model):
    return sum(p.numel() for n, p in model.named_parameters() if any(fnmatch.fnmatch(n, h) for h in models.HEAD))


def test_forward_shapes():
    torch.manual_seed(0)
    assert models.mlp(12, 16, 3, 5)(torch.randn(4, 12)).shape == (4, 5)
    assert models.small_cnn()(torch.rand(4, 1, 8, 8)).shape == (4, 10)
    assert models.resnet18(7)(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert models.resnet34()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    lm = models.gpt2(vocab_size=50, n_layer=2, n_head=2, n_embd=16, block_size=8)
    assert lm(torch.randint(50, (3, 8))).shape == (3, 8, 50)
    assert lm(torch.randint(50, (3, 5))).shape == (3, 5, 50), "shorter sequences than block_size work"
    cls = models.gpt2(vocab_size=50, n_layer=2, n_head=2, n_embd=16, block_size=8, num_classes=4)
    assert cls(torch.randint(50, (3, 8))).shape == (3, 4)


def test_parameter_counts_of_named_sizes():
    assert models.num_params(models.small_cnn()) == 149_938
    assert count(models.resnet18) == 11_173_962
    assert count(models.resnet34) == 21_282_122
    assert 24.5e6 < count(models.mlp, **models.MLP_25M) < 25.5e6
    i, h, d, c = models.MLP_25M.values()
    assert count(models.mlp, **models.MLP_25M) == i * h + h + (d - 1) * (h * h + h) + h * c + c
    assert count(models.gpt2, **models.GPT2_SMALL) == 124_439_808  # GPT-2 small, LM head tied


def test_gpt2_count_formula():
    def formula(V, L, E, T, C=None):
        return V * E + T * E + L * (12 * E * E + 13 * E) + 2 * E + (E * C + C if C else 0)

    assert count(models.gpt2, vocab_size=100, n_layer=3, n_head=4, n_embd=32, block_size=16) == formula(100, 3, 32, 16)
    assert count(models.gpt2, vocab_size=100, n_layer=3, n_head=4, n_embd=32, block_size=16,
                 num_classes=3) == formula(100, 3, 32, 16, 3)
    assert count(models.gpt2, **models.GPT2_SMALL) == formula(50257, 12, 768, 1024)


def test_every_classifier_has_a_small_head():
    for m in (models.mlp(12, 16, 2, 5), models.small_cnn(), models.resnet18(),
              models.gpt2(vocab_size=50, n_layer=1, n_head=2, n_embd=16, block_size=8, num_classes=3)):
        assert head_numel(m) > 0, type(m).__name__
    cnn = models.small_cnn()
    assert head_numel(cnn) == 330
    assert head_numel(cnn) < 0.005 * models.num_params(cnn) / 2, "the head fits a 0.5% mask budget whole"


def test_gpt2_is_causal_and_tied():
    torch.manual_seed(0)
    lm = models.gpt2(vocab_size=30, n_layer=2, n_head=2, n_embd=16, block_size=8).eval()
    a = torch.randint(30, (1, 8))
    b = a.clone()
    b[0, 5:] = (b[0, 5:] + 1) % 30
    torch.testing.assert_close(lm(a)[:, :5], lm(b)[:, :5])
    assert lm.lm_head.weight is lm.transformer.wte.weight
    with pytest.raises(ValueError, match="block_size=8"):
        lm(torch.randint(30, (1, 9)))


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="n_head"):
        models.gpt2(vocab_size=10, n_layer=1, n_head=3, n_embd=16, block_size=4)
    with pytest.raises(ValueError, match="depth"):
        models.mlp(4, 4, 0, 2)
