"""Width cores: the mask against hand-written slices, and the exported standalone core against
(a) the full model with every weight leaving a non-core unit zeroed by hand and (b) a forward
written out with explicit matmuls on the core slices."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsecomm.app.models import MLP, SmallCNN, mlp, resnet18, small_cnn
from sparsecomm.width_core import core_units, core_width, export_core, width_core_mask


@pytest.fixture
def net():
    torch.manual_seed(0)
    return mlp(in_features=6, hidden=10, depth=3, num_classes=4)


def test_core_width_is_ceil_of_the_fraction():
    assert [core_width(10, f) for f in (0.1, 0.3, 0.31, 0.5, 1.0)] == [1, 3, 4, 5, 10]
    assert core_width(3, 0.01) == 1
    for bad in (0, 1.5, -0.2, "x"):
        with pytest.raises(ValueError, match="fraction"):
            core_width(10, bad)


def test_mlp_mask_is_the_hand_written_slices(net):
    m = width_core_mask(net, 0.5)
    ref = {n: torch.zeros(p.shape, dtype=torch.bool) for n, p in net.named_parameters()}
    ref["body.0.weight"][:5, :] = True      # first layer reads every input feature
    ref["body.0.bias"][:5] = True
    for i in (2, 4):
        ref[f"body.{i}.weight"][:5, :5] = True
        ref[f"body.{i}.bias"][:5] = True
    ref["head.weight"][:, :5] = True        # all classes, core inputs only
    ref["head.bias"][:] = True
    for n in ref:
        assert torch.equal(m[n], ref[n]), n
    assert m.num_selected == (5 * 6 + 5) + 2 * (5 * 5 + 5) + (4 * 5 + 4)
    assert core_units(net, 0.5) == {"body.0": 5, "body.2": 5, "body.4": 5, "head": 4}


def zero_noncore_outgoing_mlp(model, m):
    z = copy.deepcopy(model)
    with torch.no_grad():
        for lin in (z.body[2], z.body[4], z.head):
            lin.weight[:, m:] = 0
    return z


def test_mlp_export_matches_full_model_restricted_to_core(net):
    x = torch.randn(32, 6)
    core = export_core(net, 0.5)
    assert type(core) is MLP
    assert [tuple(p.shape) for p in core.parameters()] == [(5, 6), (5,), (5, 5), (5,), (5, 5), (5,), (4, 5), (4,)]
    assert sum(p.numel() for p in core.parameters()) == width_core_mask(net, 0.5).num_selected
    # (a) the full model with every weight leaving a non-core unit set to zero
    torch.testing.assert_close(core(x), zero_noncore_outgoing_mlp(net, 5)(x), rtol=0, atol=1e-6)
    # (b) explicit matmuls on the core slices of the ORIGINAL weights
    h = x
    for lin, i in ((net.body[0], 6), (net.body[2], 5), (net.body[4], 5)):
        h = F.relu(h @ lin.weight[:5, :i].T + lin.bias[:5])
    ref = h @ net.head.weight[:, :5].T + net.head.bias
    torch.testing.assert_close(core(x), ref, rtol=0, atol=1e-6)
    # without zeroing, the non-core units do feed the full model: it is a different function
    assert not torch.allclose(core(x), net(x), atol=1e-4)


def test_export_runs_alone_and_is_independent_of_the_full_model(net):
    core = export_core(net, 0.3)
    x = torch.randn(4, 6)
    y = core(x).detach().clone()
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(123.0)
    del net
    assert torch.equal(core(x), y) and y.shape == (4, 4)
    # trainable on its own
    F.cross_entropy(core(x), torch.tensor([0, 1, 2, 3])).backward()
    assert all(p.grad is not None for p in core.parameters())


def test_full_fraction_exports_the_same_model(net):
    x = torch.randn(8, 6)
    core = export_core(net, 1.0)
    assert torch.equal(core(x), net(x))
    assert width_core_mask(net, 1.0).num_selected == sum(p.numel() for p in net.parameters())


def zero_noncore_outgoing_cnn(model):
    """small_cnn at fraction 0.5: channels 32/64/128 -> 16/32/64, fc 104/32 -> 52/16.
    Flatten is channel-major over 2x2: core channel c < 64 -> fc.0 columns [4c, 4c + 4)."""
    z = copy.deepcopy(model)
    with torch.no_grad():
        z.features[3].weight[:, 16:] = 0
        z.features[7].weight[:, 32:] = 0
        z.fc[0].weight[:, 64 * 4:] = 0
        z.fc[2].weight[:, 52:] = 0
        z.head.weight[:, 16:] = 0
    return z


@pytest.mark.parametrize("train_mode", [False, True])
def test_small_cnn_export_matches_full_model_restricted_to_core(train_mode):
    torch.manual_seed(1)
    model = small_cnn(10)
    # non-trivial BatchNorm state, so running statistics must be sliced correctly
    with torch.no_grad():
        for bn in (model.features[1], model.features[4], model.features[8]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    model.train(train_mode)
    core = export_core(model, 0.5)
    assert type(core) is SmallCNN and core.training == train_mode
    assert core_units(model, 0.5) == {"features.0": 16, "features.3": 32, "features.7": 64,
                                      "fc.0": 52, "fc.2": 16, "head": 10}
    assert tuple(core.fc[0].weight.shape) == (52, 256) and tuple(core.features[8].running_mean.shape) == (64,)
    mask = width_core_mask(model, 0.5)
    assert sum(p.numel() for p in core.parameters()) == mask.num_selected
    assert mask["fc.0.weight"][:52, :256].all() and not mask["fc.0.weight"][:, 256:].any()
    assert mask["features.4.weight"][:32].all() and not mask["features.4.weight"][32:].any()
    ref_model = zero_noncore_outgoing_cnn(model)
    x = torch.rand(16, 1, 8, 8)
    torch.testing.assert_close(core(x), ref_model(x), rtol=1e-5, atol=1e-5)
    if train_mode:  # batch statistics of the core channels were used and tracked alike
        torch.testing.assert_close(core.features[8].running_mean, ref_model.features[8].running_mean[:64])


def test_mask_and_export_hold_the_same_values(net):
    mask = width_core_mask(net, 0.5)
    core = export_core(net, 0.5)
    full = dict(net.named_parameters())
    for name, p in core.named_parameters():
        assert torch.equal(p.reshape(-1), full[name][mask[name]]), name


def test_unsupported_models_are_refused():
    with pytest.raises(TypeError, match="Fisher or random mask"):
        width_core_mask(resnet18(10), 0.5)
    seq = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    assert width_core_mask(seq, 0.5).num_selected == (4 * 4 + 4) + (3 * 4 + 3)
    with pytest.raises(TypeError, match="not a simple chain"):
        width_core_mask(nn.Sequential(nn.Linear(4, 8), nn.Linear(6, 3)), 0.5)


@pytest.mark.parametrize("make", [lambda: mlp(in_features=6, hidden=10, depth=3, num_classes=4), lambda: small_cnn(10)])
def test_isolated_core_is_the_full_model_while_only_the_core_trains(make):
    """isolate_core: the full model computes exactly the exported core, before and after masked
    training steps of the core's entries (the zeroed cross weights are outside the mask)."""
    import sparsecomm
    from sparsecomm.width_core import isolate_core

    torch.manual_seed(2)
    model = isolate_core(make(), 0.5)
    model.eval()
    x = torch.randn(8, 6) if isinstance(model, MLP) else torch.rand(8, 1, 8, 8)
    torch.testing.assert_close(model(x), export_core(model, 0.5)(x), rtol=1e-5, atol=1e-5)
    mask = width_core_mask(model, 0.5)
    opt = sparsecomm.MaskedSGD(model, mask, lr=0.5)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), torch.arange(8) % 4).backward()
        opt.step()
    model.eval()
    torch.testing.assert_close(model(x), export_core(model, 0.5)(x), rtol=1e-5, atol=1e-5)


def test_nested_core_step_trains_exactly_the_exported_core():
    """NestedCore: a masked core step on the full model moves the core's weights exactly as one
    step of the exported core trained alone; a full step leaves non-core -> core weights at 0 and
    the head's non-core columns trained."""
    import sparsecomm
    from sparsecomm.width_core import NestedCore

    torch.manual_seed(3)
    model = small_cnn(10)
    nested = NestedCore(model, 0.5)
    mask = width_core_mask(model, 0.5)
    x, y = torch.rand(16, 1, 8, 8), torch.arange(16) % 10
    alone = export_core(model, 0.5)
    alone_opt = torch.optim.SGD(alone.parameters(), lr=0.3)
    F.cross_entropy(alone(x), y).backward()
    alone_opt.step()
    opt = sparsecomm.MaskedSGD(model, mask, lr=0.3)
    head_before = model.head.weight.detach().clone()
    nested.begin_step(full=False)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()
    nested.end_step()
    assert torch.equal(model.head.weight[:, 16:], head_before[:, 16:])  # restored bit-exactly
    for (name, a), b in zip(export_core(model, 0.5).named_parameters(), alone.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    full_opt = torch.optim.SGD(model.parameters(), lr=0.3)
    nested.begin_step(full=True)
    F.cross_entropy(model(x), y).backward()
    full_opt.step()
    nested.end_step()
    assert not model.fc[0].weight[:52, 256:].any() and not model.fc[2].weight[:16, 52:].any()
    assert not model.features[3].weight[:32, 32:].any()
    assert model.head.weight[:, 16:].abs().sum() > 0  # the head's non-core columns train on full steps
