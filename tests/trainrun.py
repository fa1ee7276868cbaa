"""A tiny trainer run on N forked Gloo ranks, for the checkpoint, signal and non-finite tests.

:func:`train` is the function :func:`multirank.run_ranks` runs on every rank: it builds a
``Trainer`` from the composed config, optionally crashes it before a step (a killed job; a new
process group then resumes), poisons some ranks' inputs with NaN or asks it to stop as a signal
would, and returns what the tests compare: the summary, the final weights and the mask digest,
or the one-line error.
"""
from __future__ import annotations

import signal

import torch
from apptest import Crash, compose_app, crash_before, read_events

from sparsecomm.app import trainer

TINY = ["task=synthetic", "task.in_features=32", "task.hidden=32", "task.depth=2", "task.num_train=256",
        "task.num_test=64", "batch_size=8", "eval_every=4", "logging.progress=false", "logging.log_every=3",
        "save_model=false", "cluster.num_threads=1"]
UNTIMED = ("time", "steps_per_s", "seconds", "path")


def compose_cfg(*overrides):
    return compose_app(*TINY, *overrides)


def train(rank, world, cfg, run_dir, crash_at=None, poison=None, stop_before=None):
    """Train; ``crash_at``: raise before that step on every rank; ``poison``: {rank: steps} NaN inputs;
    ``stop_before``: {rank: step}: that rank gets a SIGTERM (recorded, as the handler would) before the step."""
    try:
        t = trainer.Trainer(cfg, run_dir, torch.device("cpu"))
    except ValueError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    if crash_at is not None:
        crash_before(t, crash_at)
    if poison and rank in poison:
        real_batch = t.data.next_batch

        def next_batch():
            inputs, targets = real_batch()
            return (inputs * float("nan") if t.step in poison[rank] else inputs), targets
        t.data.next_batch = next_batch
    if stop_before and rank in stop_before:
        real_step = t.train_step

        def train_step(s):
            if s == stop_before[rank]:
                t.stop.signum = int(signal.SIGTERM)
            return real_step(s)
        t.train_step = train_step
    try:
        summary = t.fit()
    except Crash:
        return {"crashed": True}
    except (ValueError, RuntimeError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    except Exception as e:  # noqa: BLE001 - signals.Interrupted: the line and the step it stopped at
        return {"stopped": str(e), "exit_code": getattr(e, "exit_code", None), "step": t.step}
    finally:
        t.close()
    return {"summary": summary, "params": {k: v.clone() for k, v in t.model.state_dict().items()},
            "digest": t.mask.digest() if t.mask is not None else None}


def records(run_dir):
    return read_events(run_dir)


def untimed(r):
    return {k: v for k, v in r.items() if k not in UNTIMED}


def assert_same_params(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
