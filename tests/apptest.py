"""The one home of the tests' shared helpers.

* the app's config composed as the app composes it (:func:`compose_app`), a crash on cue
  (:func:`crash_before`), the tiny one-process run (:data:`TINY`), the real entry point in this
  process (:func:`main_in_process`) and in a subprocess (:func:`run_app`);
* running the app under torchrun and reading its ``metrics.jsonl``: defined once in
  ``benchmarks/apprun.py`` (the soak benchmark uses them too) and re-exported here;

Two neighbours, each with one job: ``tests/multirank.py`` runs a function on N ranks (fork +
file:// store), ``tests/reference.py`` holds the independent references tests compare the
library with (written there once, never with the library's code).
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

import sparsecomm.app.train  # noqa: F401  registers the sc_run_id resolver

REPO = Path(__file__).resolve().parents[1]
from benchmarks.apprun import (  # noqa: F401  (re-exported: one definition, shared with the benchmarks)
    LAUNCHER_VARS, app_env, free_port, read_events, torchrun_app, torchrun_app_cmd, worker_pid)

APP = Path(sys.executable).with_name("sparsecomm-train")


def compose_app(*overrides: str) -> DictConfig:
    """``conf/train.yaml`` with ``overrides``, composed as the app does (a value of the wrong type is
    the app's one-line ConfigError); Hydra's global state is left clear."""
    return sparsecomm.app.train.compose_config(list(overrides))


class Crash(Exception):
    """Raised by a trainer armed with :func:`crash_before`."""


def crash_before(trainer, step: int) -> None:
    """Make ``trainer`` raise :class:`Crash` when it is about to train ``step`` (a killed job)."""
    real_step = trainer.train_step

    def train_step(s):
        if s == step:
            raise Crash
        return real_step(s)
    trainer.train_step = train_step


def crash_runs_before(monkeypatch, step: int):
    """Every run this test starts in-process crashes before ``step`` (as :func:`crash_before`);
    call the returned function to let runs finish again."""
    from sparsecomm.app import trainer

    real_fit = trainer.Trainer.fit

    def crashing_fit(self):
        crash_before(self, step)
        return real_fit(self)
    monkeypatch.setattr(trainer.Trainer, "fit", crashing_fit)
    return lambda: monkeypatch.setattr(trainer.Trainer, "fit", real_fit)


# One process, a few steps of digits: the smallest real run of the app.
TINY = ["cluster.nproc_per_node=1", "steps=4", "schedule.dense_steps=1", "batch_size=8", "eval_every=0",
        "eval_batch_size=128", "logging.progress=false", "++mask.num_samples=16"]


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A tmpfs mounted at ``path`` (created) with mount ``options`` (e.g. ``size=16m``, ``ro,size=1m``),
    unmounted afterwards; the test is skipped where mounting needs a root this process is not."""
    path.mkdir(exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip(f"mounting a tmpfs ({options}) needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def clean_launcher_env(monkeypatch) -> None:
    """This test's environment without a launcher's variables (the app launches, it does not join)."""
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)


def run_app(args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """The installed console entry ``sparsecomm-train args`` in a subprocess (text output captured)."""
    if not APP.exists():
        pytest.fail(f"{APP} is missing: install the package first (pip install -e .)")
    return subprocess.run([str(APP), *args], cwd=cwd, env=app_env(), capture_output=True, text=True,
                          timeout=timeout)


def main_in_process(args, capsys) -> tuple[int, str, str]:
    """``sparsecomm-train args`` in this process: (exit code, stdout, stderr). Other exceptions propagate."""
    from sparsecomm.app import train

    GlobalHydra.instance().clear()
    try:
        train.main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        GlobalHydra.instance().clear()
    out = capsys.readouterr()
    return code, out.out, out.err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


def children(pid: int) -> list[int]:
    """The processes ``pid`` (any of its threads) started that are alive."""
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
    except OSError:  # gone meanwhile
        pass
    return found


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid``: its children, theirs, and so on."""
    out, todo = [], children(pid)
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children(p)
    return out


def cmdline(pid: int) -> bytes:
    """``/proc/<pid>/cmdline`` (empty once the process is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def launcher_workers(launcher: int) -> list[int]:
    """The training workers the app's own launcher ``launcher`` started: spawned (``spawn_main``) or
    forked by its forkserver (``cluster.start_method``); not the forkserver or multiprocessing's
    resource tracker."""
    tree = descendants(launcher)
    forked = {c for q in tree if b"multiprocessing.forkserver" in cmdline(q) for c in children(q)}
    return sorted(p for p in tree if p in forked or b"spawn_main" in cmdline(p))
