"""Issue 5 in the trainer, on 2 in-process Gloo ranks (tiny synthetic MLP, a few steps each):
diff pruning's L0 phase and its bytes, the task diff written at the end (rebuilt bit-exactly
from an independently rebuilt base), core/full switching per step, width cores exported and
evaluated alone, mask refresh carrying optimizer state, and the config checks."""
from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch
from apptest import Crash, compose_app, crash_before, read_events
from multirank import run_ranks

import sparsecomm
import sparsecomm.diff as sdiff
from sparsecomm.app import config, data, trainer
from sparsecomm.width_core import export_core, isolate_core, width_core_mask

TINY = ["task=synthetic", "task.in_features=64", "task.hidden=64", "task.depth=2", "task.num_train=256",
        "task.num_test=64", "batch_size=8", "eval_every=0", "logging.progress=false", "save_model=false",
        "cluster.num_threads=1", "schedule=fish_fixed"]


def compose_cfg(*overrides):
    schedule_given = any(o.startswith("schedule=") for o in overrides)
    return compose_app(*(o for o in TINY if not (schedule_given and o.startswith("schedule="))), *overrides)


def model_bits(model) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _fit(rank, world, cfg, run_dir, probe=None):
    refresh_log = probe_refresh() if probe == "refresh" else None
    t = trainer.Trainer(cfg, run_dir, torch.device("cpu"))
    summary = t.fit()
    out = {"summary": summary, "bits": model_bits(t.model), "digest": t.mask.digest() if t.mask else None,
           "state": {k: v.clone() for k, v in t.model.state_dict().items()} if rank == 0 else None}
    if probe == "refresh":
        out["refresh"] = refresh_log
    return out


def run(tmp_path, *overrides, probe=None):
    cfg = compose_cfg(*overrides)
    return run_ranks(_fit, 2, cfg, str(tmp_path), probe, timeout=180)


def records(tmp_path, event):
    return [r for r in read_events(tmp_path) if r["event"] == event]


def initial_model(cfg):
    """The task's initial model, rebuilt the way the trainer builds it (same seed)."""
    torch.manual_seed(cfg.seed)
    return data.build_task(cfg.task).model


def assert_same_state(a: dict, b: dict):
    assert list(a) == list(b)
    for name, t in a.items():
        assert torch.equal(t, b[name]), name


# --- diff pruning ---------------------------------------------------------------------------------

def test_diff_pruning_l0_phase_bytes_mask_and_task_diff(tmp_path):
    """3 L0 steps (w + log_alpha all-reduced, dense) then 3 fixed-mask steps; the task diff
    written at the end rebuilds the final model bit-exactly from the initial model."""
    r0, r1 = run(tmp_path, "mask=diff_pruning", "mask.l0_steps=3", "steps=6", "mask.density=0.1",
                 "mask.l0_penalty=1e-3")
    s = r0["summary"]
    cfg = compose_cfg()
    base = initial_model(cfg)
    n = sum(p.numel() for p in base.parameters())
    head = sum(p.numel() for name, p in base.named_parameters() if name.startswith("head."))
    comm_numel = 2 * n - head  # every w + every gated log_alpha (the head is ungated)
    k = round(0.1 * n)
    assert (s["k"], s["numel"], s["l0_steps"], s["dense_steps"]) == (k, n, 3, 3)
    assert s["l0_comm_numel"] == comm_numel
    assert s["l0_bytes_sent"] == 3 * comm_numel * 4                      # the L0 phase: dense, ~2x
    assert s["bytes_sent"] == 3 * comm_numel * 4 + 3 * k * 4             # ... then k values per step
    assert s["dense_bytes"] == 6 * n * 4                                 # dense DDP of the plain model
    assert r0["digest"] == r1["digest"] == s["mask_digest"] and r0["bits"] == r1["bits"]
    assert [e["step"] for e in records(tmp_path, "mask")] == [3]
    assert s["l0_expected_l0"] < (n - head) * torch.sigmoid(torch.tensor(5.0)).item()  # the penalty acted
    # the task diff: k entries, rebuilt exactly on an independently rebuilt base
    assert s["task_diff_entries"] == k and s["task_diff_bytes"] < s["full_model_bytes"]
    rebuilt = sdiff.apply(base, tmp_path / "task_diff.safetensors")
    assert_same_state(rebuilt.state_dict(), r0["state"])
    other = copy.deepcopy(base)
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1.0
    with pytest.raises(sdiff.BaseMismatch):
        sdiff.apply(other, tmp_path / "task_diff.safetensors")
    untimed = lambda d: {key: v for key, v in d.items() if not key.endswith("_s")}
    assert untimed(s) == untimed(r1["summary"])  # every rank reports the same run


def test_diff_pruning_after_dense_warmup_writes_its_base(tmp_path):
    """2 dense warm-up steps, 2 L0 steps, 2 masked; structured gates, SGD. The base is the
    warmed-up model (written as base.safetensors) and the diff rebuilds the final model from it."""
    from safetensors.torch import load_model

    r0, _ = run(tmp_path, "mask=diff_pruning", "schedule.dense_steps=2", "mask.l0_steps=2", "steps=6",
                "mask.density=0.1", "mask.structured=true", "optim=sgd")
    s = r0["summary"]
    n = s["numel"]
    assert s["dense_steps"] == 4 and [e["step"] for e in records(tmp_path, "mask")] == [4]
    assert s["bytes_sent"] == 2 * n * 4 + s["l0_bytes_sent"] + 2 * s["k"] * 4
    assert s["l0_bytes_sent"] == 2 * s["l0_comm_numel"] * 4
    assert s["dense_bytes"] == 6 * n * 4
    assert "at step 2)" in s["task_diff_base"]
    base = initial_model(compose_cfg())
    load_model(base, str(tmp_path / "base.safetensors"))
    assert_same_state(sdiff.apply(base, tmp_path / "task_diff.safetensors").state_dict(), r0["state"])


# --- core/full ------------------------------------------------------------------------------------

def test_core_full_switches_bytes_per_step_and_ranks_stay_identical(tmp_path):
    """Fisher core, '3:1': masked steps send k values, full steps all n; both ranks end with the
    same bits; the full steps moved entries outside the core, so no sparse task diff is written."""
    r0, r1 = run(tmp_path, "schedule.core_full=3:1", "steps=8", "mask.num_samples=32", "mask.density=0.1",
                 "logging.log_every=1")
    s = r0["summary"]
    n, k = s["numel"], s["k"]
    per_step = [r["bytes_per_step"] for r in records(tmp_path, "train")]
    assert per_step == [k * 4, k * 4, k * 4, n * 4] * 2
    assert [r["dense"] for r in records(tmp_path, "train")] == [False, False, False, True] * 2
    assert r0["bits"] == r1["bits"] and r0["digest"] == r1["digest"]
    assert s["task_diff"] is None and "step 3" in s["task_diff_skipped"]
    base = initial_model(compose_cfg())
    mask = sparsecomm_mask(tmp_path, base)
    moved_outside = sum(int((r0["state"][name] != p.detach())[~mask[name]].sum())
                        for name, p in base.named_parameters())
    assert moved_outside > 0  # the full steps updated the whole model


def sparsecomm_mask(run_dir, model):
    from sparsecomm import Mask

    return Mask.load(run_dir / "mask.safetensors", model)


# --- width cores ----------------------------------------------------------------------------------

def cfg_dense_lr() -> float:
    return float(compose_cfg().optim.dense_lr)


def core_trained_alone_by_hand(cfg, core, steps: int) -> dict:
    """The comparison's reference, without DDP or the trainer: 2 ranks averaging gradients of the
    mean loss over equal batches is one process's step on both batches at once. torch's AdamW at
    optim.dense_lr under the cosine schedule (1 at step 0 down to min_ratio at the last step), then
    accuracy and loss over the whole test set."""
    import math

    task = data.build_task(cfg.task)
    shards = [data.ShardedData(task, r, 2, batch_size=cfg.batch_size, eval_batch_size=64, seed=cfg.seed,
                               device=torch.device("cpu")) for r in range(2)]
    opt = torch.optim.AdamW(core.parameters(), lr=cfg.optim.dense_lr, betas=tuple(cfg.optim.betas),
                            eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    lr = cfg.schedule.lr
    assert lr.name == "cosine" and lr.warmup_steps == 0 and cfg.steps == steps
    for step in range(steps):
        for g in opt.param_groups:
            cosine = 0.5 * (1 + math.cos(math.pi * step / (steps - 1)))
            g["lr"] = cfg.optim.dense_lr * (lr.min_ratio + (1 - lr.min_ratio) * cosine)
        batches = [d.next_batch() for d in shards]
        loss = sum(task.loss_fn(core(x), y) for x, y in batches) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = torch.stack([task.test_set[i][0] for i in range(len(task.test_set))])
    y = torch.stack([task.test_set[i][1] for i in range(len(task.test_set))])
    with torch.no_grad():
        out = core.eval()(x)
    return {"test_acc": (out.argmax(-1) == y).double().mean().item(), "test_loss": task.loss_fn(out, y).item()}


@pytest.mark.parametrize("core_full", [None, "1:1"])
def test_width_core_exported_and_evaluated_alone_and_trained_alone(tmp_path, core_full):
    """mask=width_core (nested, the default): the core's k entries travel on core steps (all n on
    full steps); at the end the exported core is evaluated on its own (checked here against an
    export of rank 0's final model) and the same core is trained alone."""
    extra = [f"schedule.core_full={core_full}"] if core_full else []
    r0, r1 = run(tmp_path, "mask=width_core", "mask.fraction=0.5", "mask.compare_alone=true", "steps=6", *extra)
    s = r0["summary"]
    base = isolate_core(initial_model(compose_cfg()), 0.5)  # NestedCore's start, before step 0
    mask = width_core_mask(base, 0.5)
    n, k = s["numel"], mask.num_selected
    assert s["k"] == k == s["core_numel"] and r0["bits"] == r1["bits"]
    assert s["bytes_sent"] == (6 * k * 4 if core_full is None else 3 * k * 4 + 3 * n * 4)
    final = copy.deepcopy(base)
    final.load_state_dict(r0["state"])
    # nested: the core's units never read non-core units, even after full steps
    for name, keep_out, keep_in in (("body.2.weight", 32, 32),):
        assert not final.get_parameter(name)[:keep_out, keep_in:].any()
    core = export_core(final, 0.5)
    task = data.build_task(compose_cfg().task)
    x = torch.stack([task.test_set[i][0] for i in range(len(task.test_set))])
    y = torch.stack([task.test_set[i][1] for i in range(len(task.test_set))])
    with torch.no_grad():
        acc = (core.eval()(x).argmax(-1) == y).double().mean().item()
    assert s["core_acc"] == pytest.approx(acc)
    # The core trained alone (6 dense steps on the same batches; the same whatever core_full says),
    # against one process training the initial core on both ranks' batches together.
    ref = core_trained_alone_by_hand(compose_cfg("steps=6"), export_core(base, 0.5), steps=6)
    assert s["core_alone_acc"] == ref["test_acc"] and s["core_alone_loss"] == pytest.approx(ref["test_loss"], rel=1e-5)
    assert s["core_alone_bytes"] == 6 * s["core_numel"] * 4 and s["core_alone_lr"] == cfg_dense_lr()
    if core_full is None:  # core steps only: the full model IS the core, and the change is sparse
        assert s["core_acc"] == s["test_acc"] and s["task_diff_entries"] == k
        assert_same_state(sdiff.apply(base, tmp_path / "task_diff.safetensors").state_dict(), r0["state"])
    else:
        assert s["task_diff"] is None and "step 1" in s["task_diff_skipped"]
        assert final.head.weight[:, 32:].abs().sum() > 0  # full steps trained the head's non-core columns


# --- mask refresh ---------------------------------------------------------------------------------

def state_by_position(opt, mask):
    """The optimizer's per-entry state keyed by global flat position, from the library's public
    surface: ``param_groups`` holds the packed tensor, ``state`` its moments, ``mask`` says which
    positions (model order, ascending) the packed entries are."""
    names = [n for n, _ in opt.model.named_parameters()]
    pos = torch.cat([mask[n].reshape(-1) for n in names]).nonzero().reshape(-1)
    (packed,) = opt.param_groups[0]["params"]
    st = opt.state.get(packed, {})
    return {key: dict(zip(pos.tolist(), v.tolist())) for key, v in st.items() if torch.is_tensor(v) and v.dim()}


def probe_refresh():
    """Record, at every mask refresh (``reset_mask`` of the masked optimizer, public API), the new
    mask's digest and what became of the state of entries that stay selected (carried) and of new
    entries (fresh zeros). Called in a forked rank: the patch dies with it."""
    log = []
    real = sparsecomm.MaskedAdamW.reset_mask

    def reset_mask(self, mask):
        before = state_by_position(self, self.mask)
        real(self, mask)
        after = state_by_position(self, mask)
        entry = {"digest": mask.digest()}
        for key in ("exp_avg", "exp_avg_sq"):
            kept = [p for p in after[key] if p in before[key]]
            new = [p for p in after[key] if p not in before[key]]
            entry[key] = {"kept": len(kept), "new": len(new),
                          "carried": all(after[key][p] == before[key][p] for p in kept),
                          "fresh": all(after[key][p] == 0.0 for p in new),
                          "nonzero_carried": sum(before[key][p] != 0.0 for p in kept)}
        log.append(entry)

    sparsecomm.MaskedAdamW.reset_mask = reset_mask
    return log


def test_refresh_every_m_steps_ranks_agree_and_state_carries(tmp_path):
    r0, r1 = run(tmp_path, "schedule=refresh", "schedule.dense_steps=1", "schedule.refresh_every=3", "steps=8",
                 "mask.num_samples=32", "mask.density=0.1", probe="refresh")
    log0, log1 = r0["refresh"], r1["refresh"]
    masks = records(tmp_path, "mask")
    assert [e["step"] for e in masks] == [1, 4, 7]
    assert [e["digest"] for e in log0] == [e["digest"] for e in log1]  # both ranks, every refresh
    assert [e["digest"] for e in log0] == [e["digest"] for e in masks[1:]]  # the optimizer took each new mask
    assert len({e["digest"] for e in masks}) > 1  # the mask did change
    for e in log0:
        for key in ("exp_avg", "exp_avg_sq"):
            st = e[key]
            assert st["kept"] > 0 and st["nonzero_carried"] > 0 and st["carried"], (e["step"], key, st)
            assert st["fresh"], (e["step"], key, st)
    assert r0["bits"] == r1["bits"]
    # the task diff covers the union of the three masks and rebuilds the model from the warmed-up base
    s = r0["summary"]
    assert s["task_diff_entries"] >= s["k"] and "at step 1)" in s["task_diff_base"]


# --- config checks --------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,field", [
    (["mask=diff_pruning", "mask.l0_steps=400"], r"mask\.l0_steps=400"),
    (["mask=diff_pruning", "schedule=dense_warmup", "mask.l0_steps=380"], r"schedule\.dense_steps=20"),
    (["mask=diff_pruning", "mask.l0_steps=0"], r"mask\.l0_steps"),
    (["mask=diff_pruning", "schedule=refresh"], r"schedule\.refresh_every"),
    (["mask=diff_pruning", "mask.alpha_lr=0"], r"mask\.alpha_lr"),
    (["mask=diff_pruning", "mask.stretch=[0.1,1.5]"], r"mask\.stretch"),
    (["mask=diff_pruning", "mask.temperature=-1"], r"mask\.temperature"),
    (["mask=diff_pruning", "mask.density=0"], r"mask\.density"),
    (["mask=width_core", "mask.fraction=0"], r"mask\.fraction"),
    (["mask=width_core", "mask.fraction=abc"], r"mask\.fraction"),
    (["mask=width_core", "mask.nested=maybe"], r"mask\.nested"),
])
def test_bad_fields_are_named(overrides, field):
    with pytest.raises(ValueError, match=field):
        config.check_config(compose_cfg("steps=400", *overrides))


def test_good_configs_pass():
    config.check_config(compose_cfg("mask=diff_pruning"))  # the defaults: 100 L0 steps of 400
    config.check_config(compose_cfg("mask=diff_pruning", "schedule=dense_warmup", "schedule.core_full=3:1"))
    config.check_config(compose_cfg("mask=width_core", "schedule=core_full", "mask.compare_alone=true"))


# --- the app, end to end --------------------------------------------------------------------------

@pytest.mark.slow
def test_app_diff_pruning_writes_a_task_diff_that_rebuilds_the_model(tmp_path):
    """`sparsecomm-train mask=diff_pruning` on digits, 2 workers: the summary reports the L0 phase's
    bytes and the task diff's size, and diff.apply(initial model, task_diff) == model.safetensors."""
    from safetensors.torch import load_model
    from apptest import run_app

    from sparsecomm.app import models

    proc = run_app(["mask=diff_pruning", "schedule=fish_fixed", "steps=8", "mask.l0_steps=4", "batch_size=16",
                    "eval_every=0", "logging.progress=false", f"out_dir={tmp_path}", "run_id=dp"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = tmp_path / "dp"
    s = json.loads((run_dir / "summary.json").read_text())
    assert "L0 phase" in proc.stdout and "task diff" in proc.stdout
    n, k = s["numel"], s["k"]
    assert s["bytes_sent"] == 4 * s["l0_comm_numel"] * 4 + 4 * k * 4 and s["dense_bytes"] == 8 * n * 4
    assert s["task_diff_entries"] == k and s["task_diff_bytes"] < s["full_model_bytes"] / 10
    torch.manual_seed(0)  # the trainer's seed: the digits task's initial small_cnn
    base = models.small_cnn(10)
    final = models.small_cnn(10)
    load_model(final, str(run_dir / "model.safetensors"))
    assert_same_state(sdiff.apply(base, run_dir / "task_diff.safetensors").state_dict(), final.state_dict())


# --- checkpoints (issue 6's extension point) ------------------------------------------------------

def _run_with_crash(rank, world, cfg, run_dir, crash_at=None):
    t = trainer.Trainer(cfg, run_dir, torch.device("cpu"))
    if crash_at is not None:
        crash_before(t, crash_at)
    try:
        summary = t.fit()
    except Crash:
        return "crashed"
    finally:
        t.close()
    return {"summary": summary, "state": {k: v.clone() for k, v in t.model.state_dict().items()}}


@pytest.mark.slow  # crashed and resumed 2-rank runs: 4 s each
@pytest.mark.parametrize("crash_at", [4, 7])  # checkpoints at 2 (inside the L0 phase, steps 1..4) / at 6 (after)
def test_diff_pruning_resumes_bit_exactly_inside_and_after_the_l0_phase(tmp_path, crash_at):
    cfg = compose_cfg("mask=diff_pruning", "schedule.dense_steps=1", "mask.l0_steps=4", "steps=8", "mask.density=0.1",
                      "checkpoint.every=2", "mask.l0_penalty=1e-3")
    full = run_ranks(_run_with_crash, 2, cfg, str(tmp_path / "full"), timeout=180)
    cut = str(tmp_path / "cut")
    assert run_ranks(_run_with_crash, 2, cfg, cut, crash_at, timeout=180) == ["crashed"] * 2
    resumed = run_ranks(_run_with_crash, 2, cfg, cut, timeout=180)
    for r in range(2):
        assert_same_state(full[r]["state"], resumed[r]["state"])
    a, b = full[0]["summary"], resumed[0]["summary"]
    assert b["resumed_from"].endswith(f"step-0000000{crash_at - crash_at % 2}.ckpt")
    for key in ("bytes_sent", "dense_bytes", "l0_bytes_sent", "l0_expected_l0", "mask_digest", "test_acc",
                "task_diff_entries", "task_diff_bytes"):
        assert a[key] == b[key], key
    from safetensors.torch import load_model

    base = initial_model(compose_cfg())
    load_model(base, str(tmp_path / "cut" / "base.safetensors"))
    assert_same_state(sdiff.apply(base, tmp_path / "cut" / "task_diff.safetensors").state_dict(), resumed[0]["state"])
