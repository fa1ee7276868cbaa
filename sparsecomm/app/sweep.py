"""What happened to every job of a sweep (``sparsecomm-train -m a=1,2,3``).

Hydra runs a sweep's jobs through its launcher: the basic launcher one after the other in this
process, the submitit launcher as Slurm jobs. The app runs each job so that a failed job does not
stop the sweep (``stop_sweep_on_failure=false``, the default; with ``true`` the basic launcher
starts no job after a failed one). Each job leaves a record ``<sweep dir>/.jobs/<num>.json``
(rank 0 of the job writes it, on the shared file system under Slurm): ``running`` when it starts,
then ``ran`` (its test accuracy and run folder) or ``failed`` (its one line and exit code).

At the end the process that started the sweep prints one line per planned job (:func:`report`)::

    sweep .../multirun/x: 3 jobs: 2 ran, 1 failed, 0 not started
      #0 ran          batch_size=32    test accuracy 0.9383, .../multirun/x/0
      #1 failed       batch_size=1000  error: ...
      #2 ran          batch_size=16    test accuracy 0.9444, .../multirun/x/2

and the command exits with the first failed job's code (non-zero if any failed). Nothing here
crosses the network.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode

from sparsecomm.checkpoint import write_atomic

RECORDS = ".jobs"


def in_sweep() -> bool:
    """Is this app call a job of a ``--multirun`` sweep?"""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def job_identity() -> tuple[int, str, str]:
    """This job's number, its overrides (as typed) and the sweep folder."""
    hc = HydraConfig.get()
    return int(hc.job.num), " ".join(hc.overrides.task), str(hc.sweep.dir)


def sequential_launcher() -> bool:
    """The basic launcher (jobs one after the other here): only it can stop the jobs not yet started."""
    return "BasicLauncher" in str(HydraConfig.get().launcher.get("_target_", ""))


def run_job(attempt: Callable[[], dict[str, Any] | None], failure_line: Callable[[], str | None], *,
            owner: bool, stop_on_failure: bool) -> dict[str, Any] | None:
    """Run this sweep job (``attempt``: the app's run, a user error already turned into its line and
    SystemExit) and record what happened. A failure returns None so Hydra starts the next job,
    unless ``stop_on_failure`` (basic launcher) or a signal stopped it (exit code >= 128): then it
    raises SystemExit. A bug's traceback is printed and the job recorded as failed. ``owner``: this
    process writes the record (rank 0 of the job)."""
    num, overrides, sweep_dir = job_identity()
    stop = stop_on_failure and sequential_launcher()
    if owner:
        record(sweep_dir, num, overrides, "running")
    try:
        result = attempt()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if owner:
            record(sweep_dir, num, overrides, "failed", code=code, line=failure_line() or f"exit code {code}")
        if code >= 128 or stop:
            raise
        return None
    except Exception as e:  # a bug: its traceback, then the next job
        traceback.print_exc()
        if owner:
            record(sweep_dir, num, overrides, "failed", code=1, line=f"{type(e).__name__}: {e}".splitlines()[0])
        if stop:
            raise SystemExit(1) from None
        return None
    if owner:
        record(sweep_dir, num, overrides, "ran", test_acc=(result or {}).get("test_acc"),
               run_dir=(result or {}).get("run_dir"))
    return result


def record(sweep_dir: str, num: int, overrides: str, status: str, **fields: Any) -> None:
    """Write job ``num``'s record (best effort: a record that cannot be written shows as 'no result')."""
    path = os.path.join(sweep_dir, RECORDS, f"{num}.json")
    try:
        write_atomic(path, json.dumps({"num": num, "overrides": overrides, "status": status, **fields}).encode())
    except OSError as e:
        print(f"sparsecomm: cannot write the sweep record {path} ({e.strerror})", file=sys.stderr, flush=True)


def planned_jobs(overrides: Sequence[str]) -> list[str]:
    """What tells apart each job the sweep of ``overrides`` runs, in Hydra's order: its values of the
    swept keys (``batch_size=1000``)."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    swept = {o.get_key_element() for o in parsed if o.is_sweep_override()}
    batches = BasicSweeper.split_arguments(parsed, None)
    return [" ".join(o for o in job if o.split("=", 1)[0] in swept) for batch in batches for job in batch]


def _read(sweep_dir: str, num: int) -> dict[str, Any] | None:
    try:
        with open(os.path.join(sweep_dir, RECORDS, f"{num}.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _line(num: int, overrides: str, rec: dict[str, Any] | None, width: int) -> str:
    if rec is None:
        status, what = "not started", ""
    elif rec["status"] == "ran":
        acc = rec.get("test_acc")
        accuracy = f"test accuracy {acc:.4f}, " if isinstance(acc, float) else ""
        status, what = "ran", accuracy + str(rec.get("run_dir", ""))
    elif rec["status"] == "failed":
        status, what = "failed", str(rec.get("line", ""))
    else:
        status, what = "no result", "it started but ended without reporting (killed?)"
    return f"  #{num:<3} {status:<12} {overrides:<{width}}  {what}".rstrip()


def report(sweep_dir: str, overrides: Sequence[str], stream=None) -> int:
    """Print one line per planned job; returns the exit code the sweep ends with (0: all ran)."""
    stream = stream or sys.stdout
    jobs = planned_jobs(overrides)
    recs = [_read(sweep_dir, n) for n in range(len(jobs))]
    counts = {s: sum((r or {}).get("status") == s for r in recs) for s in ("ran", "failed")}
    missing = sum(r is None for r in recs)
    width = max((len(j) for j in jobs), default=0)
    print(f"sweep {sweep_dir}: {len(jobs)} jobs: {counts['ran']} ran, {counts['failed']} failed, "
          f"{missing} not started", file=stream, flush=True)
    for num, (job, rec) in enumerate(zip(jobs, recs)):
        print(_line(num, job, rec, width), file=stream, flush=True)
    codes = [int(r.get("code", 1)) for r in recs if r is not None and r["status"] == "failed"]
    if codes:
        return codes[0]
    return 1 if missing or any(r is not None and r["status"] not in ("ran",) for r in recs) else 0
