"""Helpers for tests of the app: its config composed as the app composes it, a crash on cue."""
from __future__ import annotations

from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

import sparsecomm.app.train  # noqa: F401  registers the sc_run_id resolver


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


# A launcher's variables in the test's own environment would make the app join instead of launch.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "SLURM_PROCID", "SLURM_NTASKS",
                 "SLURM_JOB_ID", "SLURM_RESTART_COUNT", "SPARSECOMM_TRACEBACK")
# One process, a few steps of digits: the smallest real run of the app.
TINY = ["cluster.nproc_per_node=1", "steps=4", "schedule.dense_steps=1", "batch_size=8", "eval_every=0",
        "eval_batch_size=128", "logging.progress=false", "++mask.num_samples=16"]


def clean_launcher_env(monkeypatch) -> None:
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)


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
