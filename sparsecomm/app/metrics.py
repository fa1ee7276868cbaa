"""What a run reports (config group ``logging/``): rank 0 logs, every other rank gets a no-op.

* a tqdm progress bar on stderr: loss, steps/s, bytes the hook sent per step;
* ``<run dir>/metrics.jsonl``: one JSON object per line, ``{"event": "train"|"eval"|"mask"|
  "summary", "step": ..., "time": seconds since start, ...}``;
* optionally Weights & Biases (``logging=wandb``), offline by default, imported lazily: each
  record's numbers as history ``<event>/<field>`` at its step, the summary record as the run's summary.

Usage::

    logger = make_logger(cfg.logging, run_dir, total_steps=cfg.steps, config=container)
    logger.log("train", step, loss=0.3, bytes_sent=1234)
    logger.close()
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

from tqdm.auto import tqdm

from sparsecomm import distributed as sdist
from .config import check_wandb


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN / Infinity
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return _jsonable(value.item())
    return value


class NullLogger:
    """The logger of every rank but 0: accepts everything, does nothing."""

    def log(self, event: str, step: int, **fields: Any) -> None:
        pass

    def progress(self, step: int, **postfix: Any) -> None:
        pass

    def info(self, message: str) -> None:
        pass

    def write_log(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


class MetricsLogger(NullLogger):
    """Rank 0's logger: progress bar, JSONL file, wandb (each optional)."""

    def __init__(self, run_dir: str, total_steps: int, *, progress: bool = True, jsonl: bool = True,
                 wandb_cfg: Any = None, config: dict | None = None, stream=None):
        self.start = time.perf_counter()
        self.stream = stream or sys.stderr
        self._file = None
        self._bar = None
        self._wandb = None
        # Both files open at their first line: a run refused at start leaves nothing but log.txt.
        self.path = os.path.join(run_dir, "metrics.jsonl") if jsonl else None
        self.log_path = os.path.join(run_dir, "log.txt")
        self._log_file = None
        if progress:
            self._bar = tqdm(total=total_steps, unit="step", file=self.stream, dynamic_ncols=True,
                             mininterval=0.5, leave=True)
        if wandb_cfg:
            import wandb

            self._wandb = wandb.init(
                project=wandb_cfg.project, entity=wandb_cfg.entity,
                name=wandb_cfg.name or os.path.basename(os.path.abspath(run_dir)),
                mode=wandb_cfg.mode, dir=run_dir, config=config, tags=list(wandb_cfg.tags))

    def log(self, event: str, step: int, **fields: Any) -> None:
        record = {"event": event, "step": step, "time": round(time.perf_counter() - self.start, 4)}
        record.update({k: _jsonable(v) for k, v in fields.items()})
        if self.path is not None:
            if self._file is None:
                self._file = _open_for_append(self.path)
            self._file.write(json.dumps(record) + "\n")
        if self._wandb is not None and event == "summary":  # the run's outcome, strings included
            self._wandb.summary.update({k: v for k, v in record.items() if k not in ("event", "time")})
        elif self._wandb is not None:
            numbers = {f"{event}/{k}": v for k, v in record.items()
                       if isinstance(v, (int, float)) and k not in ("step", "time")}
            self._wandb.log(numbers, step=step)

    def progress(self, step: int, **postfix: Any) -> None:
        """Move the bar to ``step`` (steps done) and show ``postfix`` (e.g. loss, sent/step)."""
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)

    def info(self, message: str) -> None:
        """A log line: on the terminal (stderr) and in ``<run dir>/log.txt`` (for jobs without one)."""
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)
        self.write_log(message)

    def write_log(self, text: str) -> None:
        """Append ``text`` to ``log.txt`` only (e.g. the summary, which goes to stdout)."""
        if self._log_file is None:
            self._log_file = _open_for_append(self.log_path)
        self._log_file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        for f in (self._file, self._log_file):
            if f is not None:
                f.close()
        self._file = self._log_file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _open_for_append(path: str):
    """Line-buffered (readable while the run goes on); the run directory is made if missing."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return open(path, "a", buffering=1)


def make_logger(cfg: Any, run_dir: str, total_steps: int, config: dict | None = None) -> NullLogger:
    """Rank 0: a :class:`MetricsLogger` per the ``logging`` config; other ranks: a :class:`NullLogger`."""
    if not sdist.is_main_process():
        return NullLogger()
    check_wandb(cfg)
    return MetricsLogger(run_dir, total_steps, progress=cfg.progress, jsonl=cfg.jsonl, wandb_cfg=cfg.wandb,
                         config=config)


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000.0
    return f"{n} B"
