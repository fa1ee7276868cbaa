"""The task diff's v2 layout (issue 11): positions as varint gaps, lossless, under 1% of the model
at 0.5% density; v1 files (int64 indices) still read; damaged v2 files are one line naming the
file, even when their header hash was rewritten to match."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import sparsecomm
import sparsecomm.diff as sdiff
from test_diff import assert_bit_identical, varint_gaps


@pytest.mark.parametrize("positions", [
    [], [0], [5], [0, 1, 2, 3], [127], [128], [0, 128, 129 + 16383, 129 + 16384 + 16384],
    [2 ** 35, 2 ** 35 + 1, 2 ** 50 + 7, 2 ** 62],
])
def test_varint_gaps_round_trip_and_match_the_reference_bytes(positions):
    t = torch.tensor(positions, dtype=torch.int64)
    enc = sdiff.encode_positions(t)
    assert enc.dtype == torch.uint8 and enc.tolist() == varint_gaps(positions)
    assert sdiff.decode_positions(enc, len(positions), 2 ** 63 - 1).tolist() == positions


def test_random_positions_round_trip():
    g = torch.Generator().manual_seed(0)
    for n, k in [(10, 10), (1000, 5), (10 ** 6, 5000), (10 ** 7, 300)]:
        pos = torch.randperm(n, generator=g)[:k].sort().values
        enc = sdiff.encode_positions(pos)
        assert torch.equal(sdiff.decode_positions(enc, k, n), pos)
        assert enc.numel() == len(varint_gaps(pos.tolist()))


@pytest.mark.parametrize("data, count, numel, why", [
    ([0x85], 1, 100, "end inside a number"),
    ([0x05, 0x01], 1, 100, "hold 2 numbers for 1 values"),
    ([0x05], 2, 100, "hold 1 numbers for 2 values"),
    ([], 1, 100, "no position gaps for 1 values"),
    ([100], 1, 100, "past the parameter's 100 entries"),
    ([60, 60], 2, 100, "past the parameter's 100 entries"),
    ([0xFF] * 9 + [0x01], 1, 100, "longer than 9 bytes"),
])
def test_bad_gaps_are_refused(data, count, numel, why):
    with pytest.raises(ValueError, match=why):
        sdiff.decode_positions(torch.tensor(data, dtype=torch.uint8), count, numel)


def tuned_pair(density=0.005, seed=0):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Embedding(3000, 64), nn.Linear(64, 64), nn.Linear(64, 26))
    model = copy.deepcopy(base)
    mask = sparsecomm.random_mask(model, density=density, seed=seed, always=["2.bias"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            p[mask[name]] += 0.25
    return base, model, mask


def test_half_a_percent_is_under_one_percent_of_the_model_and_round_trips(tmp_path):
    base, model, mask = tuned_pair()
    path = tmp_path / "task.safetensors"
    sdiff.save(model, base, mask, path)
    rep = sdiff.size_report(path)
    k = mask.num_selected
    assert rep["value_bytes"] == 4 * k and rep["index_bytes"] < 2.1 * k  # gaps average ~200: 2 bytes
    assert rep["ratio"] < 0.01, rep  # v1 (int64 + fp32: 12 bytes an entry) was 1.2% + header
    assert_bit_identical(sdiff.apply(base, path), model)


def rewrite(path, tensors, meta):
    meta = dict(meta, tensors_sha256=sdiff._tensors_hash(tensors))
    save_file(tensors, str(path), metadata=meta)


def load(path):
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def test_v1_files_still_apply_bit_exactly(tmp_path):
    base, model, mask = tuned_pair(seed=3)
    path = tmp_path / "v2.safetensors"
    sdiff.save(model, base, mask, path)
    meta, tensors = load(path)
    v1 = {}
    for key, t in tensors.items():
        name, _, kind = key.rpartition("::")
        if kind == "gaps":  # the v1 layout, written out: int64 flat indices
            v1[f"{name}::indices"] = mask.flat_indices(name).to(torch.int64)
        else:
            v1[key] = t
    old = tmp_path / "v1.safetensors"
    rewrite(old, v1, dict(meta, format="sparsecomm-diff-v1"))
    assert_bit_identical(sdiff.apply(base, old), model)
    assert sdiff.size_report(old)["index_bytes"] == 8 * mask.num_selected


@pytest.mark.parametrize("damage, why", [
    ("truncate", "end inside a number"),
    ("extra", "numbers for"),
    ("past_end", "past the parameter"),
    ("no_values", "no matching parameter or values"),
    ("unknown_param", "no matching parameter or values"),
    ("v1_out_of_range", "does not index"),
])
def test_damaged_v2_with_a_rewritten_hash_is_one_line(tmp_path, damage, why):
    base, model, mask = tuned_pair(seed=5)
    path = tmp_path / "t.safetensors"
    sdiff.save(model, base, mask, path)
    meta, tensors = load(path)
    key = "1.weight::gaps"
    g = tensors[key]
    if damage == "truncate":
        tensors[key] = torch.cat([g, torch.tensor([0x80], dtype=torch.uint8)])
    elif damage == "extra":
        tensors[key] = torch.cat([g, torch.tensor([0x01], dtype=torch.uint8)])
    elif damage == "past_end":
        tensors[key] = torch.cat([g[:-1], torch.tensor([0xFF, 0x7F], dtype=torch.uint8)])
    elif damage == "no_values":
        del tensors["1.weight::values"]
    elif damage == "unknown_param":
        tensors["9.weight::gaps"] = g.clone()
        tensors["9.weight::values"] = tensors["1.weight::values"].clone()
    elif damage == "v1_out_of_range":
        meta["format"] = "sparsecomm-diff-v1"
        del tensors[key]
        tensors["1.weight::indices"] = torch.tensor([0, 64 * 64], dtype=torch.int64)
        tensors["1.weight::values"] = torch.zeros(2)
    bad = tmp_path / "bad.safetensors"
    rewrite(bad, tensors, meta)
    with pytest.raises(ValueError, match=why) as e:
        sdiff.apply(base, bad)
    msg = str(e.value)
    assert "\n" not in msg and str(bad) in msg and "sparsecomm.diff.save" in msg
    json.dumps(msg)
