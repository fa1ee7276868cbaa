"""The fine-tuning mask kinds in the trainer on 2 in-process Gloo ranks (tiny synthetic models):
every rank holds the same masks (digests) and weights, entries outside the masks keep their
start value bit for bit, the learned mask's refresh respects its drop/grow limit and resumes
from a checkpoint exactly, token rows sit on the tokens the training set holds, and bad fields
are one line naming them."""
from __future__ import annotations

import os

import pytest
import torch
from apptest import compose_app
from multirank import run_ranks
from trainrun import assert_same_params, train

from sparsecomm.app import trainer
from sparsecomm.app.config import ConfigError
from sparsecomm.checkpoint import decode, encode
from sparsecomm.mask import Mask

MLP = ["task=synthetic", "task.in_features=64", "task.hidden=64", "task.depth=2", "task.num_train=256",
       "task.num_test=64", "batch_size=8", "eval_every=0", "logging.progress=false", "save_model=false",
       "save_diff=false", "cluster.num_threads=1", "schedule=fish_fixed", "mask.density=0.1"]
GPT2 = ["task=synthetic", "task.model=gpt2", "task.vocab_size=200", "task.n_layer=1", "task.n_head=2",
        "task.n_embd=16", "task.block_size=8", "task.num_train=24", "task.num_test=16", "batch_size=4",
        "eval_every=0", "logging.progress=false", "save_model=false", "save_diff=false", "cluster.num_threads=1",
        "schedule=fish_fixed", "mask.density=0.1"]
LEARNED = ["mask=learned", "mask.refresh_every=3", "mask.max_change=0.1", "steps=8"]


def _fit(rank, world, cfg, run_dir):
    t = trainer.Trainer(cfg, run_dir, torch.device("cpu"))
    start = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    masks = []
    choose = t.kind.new_mask

    def recording(view):
        change = choose(view)
        masks.append(change.mask)
        return change
    t.kind.new_mask = recording
    try:
        summary = t.fit()
    finally:
        t.close()
    return {"summary": summary, "digests": [m.digest() for m in masks], "masks": [dict(m.items()) for m in masks],
            "start": start, "final": {n: p.detach().clone() for n, p in t.model.named_parameters()},
            "train": t.task.train_set.tensors[0] if hasattr(t.task.train_set, "tensors") else None}


def run(tmp_path, *overrides, base=MLP):
    return run_ranks(_fit, 2, compose_app(*base, *overrides), str(tmp_path), timeout=300)


def assert_same_on_both_ranks(r0, r1):
    assert r0["digests"] == r1["digests"] and r0["digests"], "every rank chose the same masks"
    assert r0["summary"]["mask_digest"] == r0["digests"][-1]
    for n in r0["final"]:
        assert torch.equal(r0["final"][n], r1["final"][n]), f"{n} differs between ranks"


def assert_outside_untouched(result, reference):
    """Entries no mask selected hold ``reference`` bit for bit; some selected ones moved."""
    union = {n: torch.zeros_like(b) for n, b in result["masks"][0].items()}
    for m in result["masks"]:
        for n in union:
            union[n] |= m[n]
    moved = 0
    for n, final in result["final"].items():
        assert torch.equal(final[~union[n]], reference[n][~union[n]]), f"{n}: an unmasked entry changed"
        moved += int((final[union[n]] != reference[n][union[n]]).sum())
    assert moved > 0, "training changed nothing: the test would not see a leak"


def test_fisher_scaled_same_mask_everywhere_and_nothing_outside_it_moves(tmp_path):
    r0, r1 = run(tmp_path, "mask=fisher_scaled", "mask.num_samples=32", "mask.batch_size=8", "steps=4")
    assert_same_on_both_ranks(r0, r1)
    assert_outside_untouched(r0, r0["start"])
    assert r0["summary"]["mask_score_bytes"] > 0


def test_fisher_scaled_differs_from_plain_fisher(tmp_path):
    """Dividing by the activation scale changes which entries win (else the kind is plain FISH)."""
    scaled = run(tmp_path / "a", "mask=fisher_scaled", "mask.num_samples=32", "mask.batch_size=8", "steps=1")
    plain = run(tmp_path / "b", "mask=fisher", "mask.num_samples=32", "mask.batch_size=8", "steps=1")
    assert scaled[0]["digests"] != plain[0]["digests"]


def test_lottery_rewinds_and_trains_only_what_the_dense_phase_moved_most(tmp_path):
    r0, r1 = run(tmp_path, "mask=lottery", "mask.dense_steps=2", "steps=5")
    assert_same_on_both_ranks(r0, r1)
    # rewound to the start: every entry outside the mask is the initial weight again
    assert_outside_untouched(r0, r0["start"])
    s = r0["summary"]
    assert s["dense_steps"] == 2
    assert s["bytes_sent"] >= 2 * sum(v.numel() * 4 for v in r0["start"].values()), "the dense phase is counted"


@pytest.mark.parametrize("normalise", ["none", "rows_and_columns"])
def test_learned_mask_refreshes_within_its_limit_and_trains_only_its_masks(tmp_path, normalise):
    r0, r1 = run(tmp_path, *LEARNED, f"mask.normalise={normalise}")
    assert_same_on_both_ranks(r0, r1)
    assert_outside_untouched(r0, r0["start"])
    masks = r0["masks"]
    assert len(masks) == 3, "the first mask, then refreshes before steps 3 and 6"
    k = sum(int(b.sum()) for n, b in masks[0].items() if not n.startswith("head."))
    swapped = 0
    for old, new in zip(masks, masks[1:]):
        grown = sum(int((new[n] & ~old[n]).sum()) for n in new)
        assert grown <= int(0.1 * k), "the drop/grow limit"
        assert sum(int(b.sum()) for b in new.values()) == sum(int(b.sum()) for b in old.values())
        assert all(new[n].all() for n in new if n.startswith("head.")), "the head stays whole"
        swapped += grown
    assert swapped > 0 and r0["summary"]["entries_swapped"] == swapped


@pytest.mark.slow
def test_learned_mask_resumed_between_refreshes_is_the_uninterrupted_run(tmp_path):
    overrides = [*MLP, *LEARNED, "checkpoint.every=1", "checkpoint.keep=100"]
    full = run_ranks(train, 2, compose_app(*overrides), str(tmp_path / "full"), timeout=300)
    ckpts = tmp_path / "full" / "checkpoints"
    for at in (4, 6):  # mid-way through the sums; right at the refresh
        path = str(ckpts / f"step-{at:08d}.ckpt")
        resumed = run_ranks(train, 2, compose_app(*overrides, f"checkpoint.resume={path}"),
                            str(tmp_path / f"from{at}"), timeout=300)
        assert resumed[0]["summary"]["resumed_from"].endswith(f"step-{at:08d}.ckpt")
        for a, b in zip(full, resumed):
            assert a["digest"] == b["digest"]
            assert_same_params(a["params"], b["params"])
    # the sums are what carries the refresh: a checkpoint without them refreshes to another mask
    with open(ckpts / "step-00000005.ckpt", "rb") as f:
        sd = decode(f.read())
    sd["state"]["mask_kind"]["squares"] = None
    forgetful = str(tmp_path / "forgetful.ckpt")
    with open(forgetful, "wb") as f:
        f.write(encode(sd))
    other = run_ranks(train, 2, compose_app(*overrides, f"checkpoint.resume={forgetful}"),
                      str(tmp_path / "forgetful"), timeout=300)
    assert other[0]["digest"] != full[0]["digest"]


def test_token_rows_sit_on_the_tokens_of_the_training_set(tmp_path):
    r0, r1 = run(tmp_path, "mask=token_rows", "mask.embedding=*wte.weight", "mask.num_samples=8",
                 "mask.batch_size=4", "steps=3", base=GPT2)
    assert_same_on_both_ranks(r0, r1)
    assert_outside_untouched(r0, r0["start"])
    mask = r0["masks"][0]
    present = set(r0["train"].reshape(-1).tolist())
    rows = set(mask["transformer.wte.weight"].any(1).nonzero().reshape(-1).tolist())
    assert rows and rows <= present, "entries only on rows of tokens the training set holds"
    dim = mask["transformer.wte.weight"].shape[1]
    assert int(mask["transformer.wte.weight"].sum()) >= round(0.1 * len(present) * dim)
    assert Mask(mask).num_selected <= round(0.1 * sum(b.numel() for b in mask.values()))


@pytest.mark.parametrize("overrides, message", [
    (["mask=learned", "mask.max_change=1.5"], "mask.max_change=1.5 must be a fraction in [0, 1]"),
    (["mask=learned", "mask.refresh_every=0"], "mask.refresh_every=0 must be >= 1"),
    (["mask=learned", "schedule=refresh", "schedule.dense_steps=0", "schedule.refresh_every=7"], "set one of them"),
    (["mask=lottery", "mask.dense_steps=9", "steps=5"], "leaves no sparse step"),
    (["mask=learned", "mask.normalise=activation"], "needs a data pass"),
    (["mask=fisher_scaled", "mask.normalise=both"], "mask.normalise='both' is not a score normalisation"),
    (["mask=token_rows", "mask.embedding=*nothing*"], "mask.embedding='*nothing*' matches 0"),
])
def test_bad_fields_are_named(tmp_path, overrides, message):
    cfg = compose_app(*MLP, "steps=10", *overrides)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("*", r"\*")):
        t = trainer.Trainer(cfg, str(tmp_path), torch.device("cpu"))
        t.close()


def test_the_finetune_preset_picks_the_head_to_heads_winner_and_yields_to_the_command_line():
    cfg = compose_app("task=wordnet", "preset=finetune")
    assert (cfg.mask.name, cfg.mask.density, cfg.optim.lr) == ("random", 0.005, 3e-3)
    assert (cfg.schedule.name, cfg.schedule.dense_steps, cfg.schedule.lr.name) == ("fish_fixed", 0, "constant")
    mine = compose_app("task=wordnet", "preset=finetune", "mask.density=0.02", "optim.lr=1e-3")
    assert (mine.mask.density, mine.optim.lr) == (0.02, 1e-3)


@pytest.mark.slow
def test_lottery_resumed_inside_and_after_its_dense_phase_is_the_uninterrupted_run(tmp_path):
    """Resumed inside the dense phase, the kind's start weights are the rebuilt initial model's."""
    overrides = [*MLP, "mask=lottery", "mask.dense_steps=2", "steps=5", "checkpoint.every=1", "checkpoint.keep=100"]
    full = run_ranks(train, 2, compose_app(*overrides), str(tmp_path / "full"), timeout=300)
    for at in (1, 3):
        path = str(tmp_path / "full" / "checkpoints" / f"step-{at:08d}.ckpt")
        resumed = run_ranks(train, 2, compose_app(*overrides, f"checkpoint.resume={path}"),
                            str(tmp_path / f"from{at}"), timeout=300)
        for a, b in zip(full, resumed):
            assert a["digest"] == b["digest"]
            assert_same_params(a["params"], b["params"])


@pytest.mark.slow  # two 2-rank runs: 4 s
def test_learned_mask_normalised_sums_choose_other_entries(tmp_path):
    plain = run(tmp_path / "a", *LEARNED)
    flat = run(tmp_path / "b", *LEARNED, "mask.normalise=rows_and_columns")
    assert plain[0]["digests"][0] == flat[0]["digests"][0], "the same random start"
    assert plain[0]["digests"][1:] != flat[0]["digests"][1:]
