"""``sparsecomm-table``: one Markdown table from the ``summary.json`` of run folders.

    sparsecomm-table outputs/multirun/2026-01-01_12-00-00          # a sweep's folder
    sparsecomm-table outputs/run_a outputs/run_b                   # run folders
    python -m sparsecomm.app.table outputs/multirun/x > results.md

One row per config: comm, mask, density, lr, the other config fields that differ between the
runs, then the test accuracy, MB (10^6 bytes) each rank handed to the gradient all-reduce, the
ratio to dense DDP's bytes and the training loop's seconds. Runs whose configs differ only in
``seed`` share a row: the mean +- the sample standard deviation over their seeds. The numbers
come from each run's ``summary.json``, the config from its ``config.yaml``. A run folder
without a summary (a failed or unfinished job) is named in a warning on stderr; no summary
at all is one ``error:`` line and exit code 2. Reads files only; nothing crosses the network.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

# config fields that say where and how a run was kept, not what it trained: never a column
NOT_TRAINING = ("seed", "run_id", "out_dir", "logging", "checkpoint", "save_model", "save_diff", "num_workers",
                "eval_every", "eval_batch_size", "stop_sweep_on_failure", "cluster.rdzv", "cluster.timeout_s",
                "cluster.start_method", "cluster.num_threads", "nonfinite", "task.data_dir", "task.model_dir")
SHOWN = ("comm.name", "mask.name", "mask.density", "optim.lr", "optim.dense_lr")


class TableError(Exception):
    """Nothing to tabulate; the message says what was looked at."""


def run_folders(paths: Sequence[str]) -> tuple[list[Path], list[str]]:
    """The run folders among ``paths`` (a run folder, or a sweep folder holding them) and the warnings."""
    runs, warnings = [], []
    for raw in paths:
        path = Path(raw)
        if not path.is_dir():
            warnings.append(f"{raw} is not a folder; pass run folders or a sweep's folder")
        elif _is_run(path):
            runs.append(path)
        else:
            inside = sorted((p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".") and _is_run(p)),
                            key=_job_order)
            if not inside:
                warnings.append(f"{raw} holds no run folder (no summary.json, config.yaml or log.txt in it or "
                                f"its subfolders)")
            runs += inside
    return runs, warnings


def _is_run(path: Path) -> bool:
    return any((path / name).is_file() for name in ("summary.json", "config.yaml", "log.txt"))


def _job_order(path: Path) -> tuple[int, int | str]:
    return (0, int(path.name)) if path.name.isdigit() else (1, path.name)


def load_runs(folders: Iterable[Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """``{"folder", "summary", "config"}`` per folder with a readable summary; warnings for the others."""
    runs, warnings = [], []
    for folder in folders:
        summary = folder / "summary.json"
        if not summary.is_file():
            warnings.append(f"{folder} has no summary.json (the run failed or has not finished): left out")
            continue
        try:
            data = json.loads(summary.read_text())
        except (OSError, ValueError) as e:
            warnings.append(f"{summary} cannot be read ({e}): left out")
            continue
        config = folder / "config.yaml"
        cfg = yaml.safe_load(config.read_text()) if config.is_file() else {}
        runs.append({"folder": folder, "summary": data, "config": _flatten(cfg or {})})
    return runs, warnings


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if isinstance(value, list) else value
    return out


def _training(key: str) -> bool:
    return not any(key == k or key.startswith((f"{k}.", f"{k}_")) for k in NOT_TRAINING)


def varying_fields(runs: list[dict[str, Any]]) -> list[str]:
    """Training config fields whose values differ between runs of the same group option (seed and
    bookkeeping aside): ``comm.rank`` when PowerSGD runs differ in it, not because one run is dense."""
    keys = sorted({k for r in runs for k in r["config"]})
    return [k for k in keys if _training(k) and not _follows_seed(runs, k)
            and any(len(values) > 1 for values in _values_by_option(runs, k))]


def _follows_seed(runs: list[dict[str, Any]], key: str) -> bool:
    """A ``*.seed`` field that holds its run's own ``seed`` wherever it is set (``mask.seed: ${seed}``,
    resolved in the saved config): it varies with the seeds, which share a row, so it is no column."""
    return key.endswith(".seed") and all(r["config"][key] == r["config"].get("seed") for r in runs if key in r["config"])


def _values_by_option(runs: list[dict[str, Any]], key: str) -> list[set[str]]:
    """The distinct values of ``key`` among the runs that have it, per option of its group."""
    group = key.rpartition(".")[0]
    by_option: dict[str, set[str]] = {}
    for r in runs:
        if key in r["config"]:
            option = repr(r["config"].get(f"{group}.name", r["config"].get(f"{group}._target_")))
            by_option.setdefault(option, set()).add(repr(r["config"][key]))
    return list(by_option.values())


def group_runs(runs: list[dict[str, Any]], fields: list[str]) -> list[list[dict[str, Any]]]:
    """Runs with the same values of ``fields`` (and the same comm, mask, density), in first-seen order."""
    groups: dict[tuple, list] = {}
    for r in runs:
        s = r["summary"]
        key = (s.get("comm"), s.get("mask"), s.get("density")) + tuple(repr(r["config"].get(f)) for f in fields)
        groups.setdefault(key, []).append(r)
    return list(groups.values())


def _lr(run: dict[str, Any]) -> Any:
    """The learning rate the run's entries trained at: optim.lr for a mask's sparse steps, else optim.dense_lr."""
    sparse = run["summary"].get("mask") not in ("dense", "unused", None)
    return run["config"].get("optim.lr" if sparse else "optim.dense_lr")


def _spread(values: list[float], fmt: str) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return format(mean, fmt) if sd == 0 else f"{format(mean, fmt)} ± {format(sd, fmt)}"


def _value(v: Any, fmt: str = "g") -> str:
    return "-" if v is None else (format(v, fmt) if isinstance(v, float) else str(v))


def markdown(runs: list[dict[str, Any]]) -> str:
    """The table: one row per config (seeds merged), in the order the runs came."""
    varying = varying_fields(runs)
    extra = [f for f in varying if f not in SHOWN]
    head = ["comm", "mask", "density", "lr", *extra, "seeds", "test acc", "MB sent / rank", "ratio to dense",
            "train s"]
    rows = []
    for group in group_runs(runs, varying):
        s0, mb = group[0]["summary"], 1e6
        rows.append([
            _value(s0.get("comm", "masked")), _value(s0.get("mask")), _value(s0.get("density"), ".4g"),
            _value(_lr(group[0])), *(_value(group[0]["config"].get(f)) for f in extra), str(len(group)),
            _spread([r["summary"].get("test_acc") for r in group], ".4f"),
            _spread([r["summary"]["bytes_sent"] / mb for r in group if "bytes_sent" in r["summary"]], ".3f"),
            _spread([r["summary"].get("ratio") for r in group], ".4f"),
            _spread([r["summary"].get("train_s") for r in group], ".1f"),
        ])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def table(paths: Sequence[str], warn=lambda line: None) -> str:
    """The Markdown table of ``paths``; each warning goes to ``warn`` first. :class:`TableError`
    when no folder has a summary."""
    folders, warnings = run_folders(paths)
    runs, more = load_runs(folders)
    for line in warnings + more:
        warn(line)
    if not runs:
        raise TableError(f"no summary.json in {', '.join(paths)}: pass finished run folders or a sweep's folder "
                         f"(e.g. outputs/multirun/<date>)")
    return markdown(runs)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sparsecomm-table", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", help="run folders, or sweep folders holding them")
    args = parser.parse_args(argv)
    try:
        text = table(args.folders, warn=lambda line: print(f"warning: {line}", file=sys.stderr))
    except TableError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(text)


if __name__ == "__main__":
    main()
