"""The trainer's measurement callbacks and a kind's local-gradient point, on 2 Gloo ranks.

Callbacks are checked against what the run writes independently (``metrics.jsonl``'s train and
eval records, the mask file's k); local gradients against plain autograd on the rank's batch.
"""
from __future__ import annotations

import pytest
import torch
from apptest import compose_app, read_events
from multirank import run_ranks
from torch.nn.parallel import DistributedDataParallel

from sparsecomm import Mask, register_masked_allreduce
from sparsecomm.app import trainer
from sparsecomm.app.callbacks import Callback, Callbacks
from sparsecomm.app.engine import StepEngine
from sparsecomm.app.masks.base import MaskKind, watch_local_gradients

TINY = ["task=synthetic", "task.in_features=32", "task.hidden=32", "task.depth=2", "task.num_train=256",
        "task.num_test=64", "batch_size=8", "logging.progress=false", "save_model=false", "cluster.num_threads=1"]


class Recorder(Callback):
    wants_step_times = True

    def __init__(self):
        self.started_at, self.steps, self.evals = None, [], []

    def on_train_start(self, state):
        self.started_at = state.step

    def on_step_end(self, state, step, loss, times):
        self.steps.append({"step": step, "loss": float(loss), "phases": sorted(times) if times else None,
                           "seconds_ok": all(v >= 0 for v in times.values()) if times else False,
                           "bytes_sent": state.sync.bytes_sent, "state_step": state.step})

    def on_eval(self, state, step, result):
        self.evals.append((step, result["test_acc"], result["test_loss"]))

    def on_train_end(self, state, summary):
        return {"recorded_steps": len(self.steps)}


def _fit_with_recorder(rank, world, cfg, run_dir):
    rec = Recorder()
    t = trainer.Trainer(cfg, run_dir, torch.device("cpu"), callbacks=[rec])
    try:
        summary = t.fit()
    finally:
        t.close()
    return {"summary": summary, "started_at": rec.started_at, "steps": rec.steps, "evals": rec.evals}


@pytest.mark.slow  # 2-rank app runs with evaluations: 7 s
def test_callbacks_see_every_step_eval_and_add_summary_fields(tmp_path):
    cfg = compose_app(*TINY, "mask=random", "mask.density=0.3", "schedule=fish_fixed", "steps=6", "eval_every=3",
                      "logging.log_every=1")
    r0, r1 = run_ranks(_fit_with_recorder, 2, cfg, str(tmp_path), timeout=120)
    k = Mask.load(tmp_path / "mask.safetensors").num_selected
    for r in (r0, r1):
        assert r["started_at"] == 0 and [s["step"] for s in r["steps"]] == [1, 2, 3, 4, 5, 6]
        assert all(s["state_step"] == s["step"] for s in r["steps"])
        assert all(s["phases"] == ["backward", "forward", "optimizer"] and s["seconds_ok"] for s in r["steps"])
        # every step is masked (fish_fixed, no warm-up): k fp32 values handed to all-reduce per step
        assert [s["bytes_sent"] for s in r["steps"]] == [i * k * 4 for i in range(1, 7)]
        assert r["summary"]["recorded_steps"] == 6
    events = read_events(tmp_path)
    # the train records average the loss over the ranks (log_every=1: one step per record)
    train = [e for e in events if e["event"] == "train"]
    assert [e["step"] for e in train] == [1, 2, 3, 4, 5, 6]
    for e, a, b in zip(train, r0["steps"], r1["steps"]):
        assert abs(e["loss"] - (a["loss"] + b["loss"]) / 2) < 1e-6
    evals = [(e["step"], e["test_acc"], e["test_loss"]) for e in events if e["event"] == "eval"]
    assert r0["evals"] == r1["evals"] == evals and [s for s, *_ in evals] == [3, 6]


class LocalSquares(MaskKind):
    """A kind that sums its local gradients' squares (as a learned mask would)."""

    name = "local_squares_test"
    wants_local_gradients = True

    def __init__(self):  # no config: the hooks alone are under test
        self.seen: dict[str, torch.Tensor] = {}

    def local_gradient(self, name, grad):
        self.seen[name] = grad.detach().clone()


def _local_vs_reduced(rank, world):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    reference = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    reference.load_state_dict(model.state_dict())
    ddp = DistributedDataParallel(model, gradient_as_bucket_view=True, bucket_cap_mb=1e-5)  # several buckets
    mask = Mask({n: torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) < 0.3
                 for n, p in model.named_parameters()})
    register_masked_allreduce(ddp, mask)
    kind = LocalSquares()
    handles = watch_local_gradients(kind, model)
    torch.manual_seed(10 + rank)  # each rank its own batch
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    torch.nn.functional.cross_entropy(ddp(x), y).backward()
    torch.nn.functional.cross_entropy(reference(x), y).backward()
    local_ok = all(torch.allclose(kind.seen[n], p.grad) for n, p in reference.named_parameters())
    reduced_differs = any(not torch.allclose(kind.seen[n], p.grad) for n, p in model.named_parameters())
    for h in handles:
        h.remove()
    kind.seen.clear()
    model.zero_grad()
    torch.nn.functional.cross_entropy(ddp(x), y).backward()
    return {"local": local_ok, "reduced_differs": reduced_differs, "after_remove": len(kind.seen)}


def test_a_kind_sees_its_rank_s_local_gradients_before_the_all_reduce():
    for r in run_ranks(_local_vs_reduced, 2, timeout=60):
        assert r == {"local": True, "reduced_differs": True, "after_remove": 0}


def test_a_kind_that_wants_no_local_gradients_gets_no_hooks():
    class Plain(LocalSquares):
        wants_local_gradients = False

    assert watch_local_gradients(Plain(), torch.nn.Linear(2, 2)) == []


def test_several_callbacks_act_as_one():
    class Quiet(Callback):
        def on_train_end(self, state, summary):
            return {"a": 1, "b": 1}

    class Timed(Callback):
        wants_step_times = True

        def on_train_end(self, state, summary):
            return {"b": 2}

    assert not Callbacks([Quiet()]).wants_step_times and Callbacks([Quiet(), Timed()]).wants_step_times
    assert Callbacks([Quiet(), Timed()]).on_train_end(None, {}) == {"a": 1, "b": 2}  # later callbacks win
    assert Callbacks().on_train_end(None, {}) == {}


def test_the_engine_times_a_step_only_when_asked():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    batch = (torch.randn(3, 4), torch.tensor([0, 1, 0]))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    plain = StepEngine(torch.nn.functional.cross_entropy)
    plain.step(model, batch, opt)
    assert plain.last_times is None
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(batch[0]), batch[1]).item()  # before the timed update
    timed = StepEngine(torch.nn.functional.cross_entropy, timed=True)
    loss = timed.step(model, batch, opt, 0.1)
    assert sorted(timed.last_times) == ["backward", "forward", "optimizer"] and min(timed.last_times.values()) >= 0
    assert loss.item() == pytest.approx(expected)
