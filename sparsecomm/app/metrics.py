"""What a run reports (config group ``logging/``): rank 0 logs, every other rank gets a no-op.

* a tqdm progress bar on stderr: loss, steps/s, bytes the hook sent per step;
* ``<run dir>/metrics.jsonl``: one JSON object per line, ``{"event": "train"|"eval"|"mask"|
  "summary", "step": ..., "time": seconds since start, ...}``. Each step appears once, also
  after a crash: a resumed run first cuts the file back to the record of the checkpoint it
  resumes from (:func:`rewind_records`; its ``resume`` record counts the lines dropped), and a
  line a crash cut short is dropped, so every line is a whole record;
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
from sparsecomm.checkpoint import write_atomic
from . import writes
from .config import check_wandb
from .units import human_bytes  # noqa: F401  (re-exported: report and task_diff use it from here)


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

    def rewind(self, step: int) -> int:
        return 0

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
                self._file = _open_for_append(self.path, whole_lines=True)
            _append_line(self._file, self.path, json.dumps(record) + "\n")
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
            self._log_file = _open_for_append(self.log_path, whole_lines=False)
        _append_line(self._log_file, self.log_path, f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")

    def rewind(self, step: int) -> int:
        """A run (re)starting at ``step`` in a folder with metrics: cut ``metrics.jsonl`` back to what
        was logged up to that step's checkpoint (:func:`rewind_records`); the number of records cut."""
        if self.path is None or not os.path.exists(self.path):
            return 0
        if self._file is not None:
            self._file.close()
            self._file = None
        return rewind_records(self.path, step)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        for f in (self._file, self._log_file):
            if f is not None:
                try:
                    f.close()
                except OSError:  # its write already failed and was reported (writes.WriteError)
                    pass
        self._file = self._log_file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _open_for_append(path: str, whole_lines: bool):
    """For appending whole lines (:func:`_append_line`); the run directory is made if missing.

    A file that a crash left ending inside a line gets the next record on a fresh line: with
    ``whole_lines`` (``metrics.jsonl``, one JSON object per line) the cut line is dropped, else
    (``log.txt``) it is ended with a newline.
    """
    with writes.writing(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        f = open(path, "a+b", buffering=0)
        try:
            end = f.seek(0, os.SEEK_END)
            if end:
                f.seek(end - 1)
                if f.read(1) != b"\n":
                    if whole_lines:
                        f.seek(0)
                        body = f.read()
                        f.truncate(body.rfind(b"\n") + 1)
                    else:
                        f.write(b"\n")
        finally:
            f.close()
        return open(path, "ab", buffering=0)  # unbuffered: each line is on disk when log() returns


def _append_line(f, path: str, line: str) -> None:
    """Append ``line`` to the unbuffered file ``f``; a failed write (a full disk) is a WriteError
    and leaves no partial line."""
    data = line.encode()
    with writes.writing(path, needed=len(data)):
        start = os.fstat(f.fileno()).st_size
        try:
            done = 0
            while done < len(data):
                done += f.write(data[done:])
        except OSError:
            try:
                os.ftruncate(f.fileno(), start)
            except OSError:
                pass
            raise


# Records logged at a checkpoint's step before the checkpoint was written (the rest is the re-trained steps').
BEFORE_CHECKPOINT = ("train", "eval", "checkpoint")


def rewind_records(path: str, step: int) -> int:
    """Cut ``metrics.jsonl`` back to the record of the checkpoint at ``step`` (the one a run resumes
    from), dropping what a crashed run logged after it: the resumed run logs those steps again, so
    each step appears once. Without that record (another checkpoint.dir, a cut file): every record
    up to ``step``'s train/eval/checkpoint records. Lines that are not JSON records are dropped too.
    Rewritten atomically; returns the number of lines dropped."""
    with writes.writing(path):
        with open(path, "rb") as f:
            lines = f.read().splitlines(keepends=True)
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        records.append(record if isinstance(record, dict) and isinstance(record.get("step"), int) else None)
    marks = [i for i, r in enumerate(records) if r is not None and r["event"] == "checkpoint" and r["step"] == step]
    if marks:
        keep = [line for line, r in zip(lines[:marks[-1] + 1], records) if r is not None]
    else:
        keep = []
        for line, r in zip(lines, records):
            if r is None:
                continue
            if r["step"] > step or (r["step"] == step and r["event"] not in BEFORE_CHECKPOINT):
                break
            keep.append(line)
    dropped = len(lines) - len(keep)
    if dropped:
        with writes.writing(path, needed=sum(map(len, keep))):
            mode = os.stat(path).st_mode & 0o777
            write_atomic(path, b"".join(keep))
            os.chmod(path, mode)
    return dropped


def make_logger(cfg: Any, run_dir: str, total_steps: int, config: dict | None = None) -> NullLogger:
    """Rank 0: a :class:`MetricsLogger` per the ``logging`` config; other ranks: a :class:`NullLogger`."""
    if not sdist.is_main_process():
        return NullLogger()
    check_wandb(cfg)
    return MetricsLogger(run_dir, total_steps, progress=cfg.progress, jsonl=cfg.jsonl, wandb_cfg=cfg.wandb,
                         config=config)
