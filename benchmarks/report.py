"""Report writing shared by the benchmarks: markdown tables, JSON, verdicts, plots, the README.

Every benchmark writes ``<name>.md`` (tables + verdicts + the command), ``<name>.json`` (all
measurements) and its PNG plots into one output directory (``benchmarks/results/`` by default).
When it writes to the default directory it also replaces its own block in
``benchmarks/README.md`` (between ``<!-- BEGIN name -->`` and ``<!-- END name -->``), so the README
always quotes the latest table and the command that produced it.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import shlex
import statistics
import sys
from collections.abc import Callable, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
README = os.path.join(HERE, "README.md")


# --- verdicts --------------------------------------------------------------------------------------
def verdict(target: str, holds: bool | None, measured: str) -> dict:
    """One target's outcome: HOLDS / MISSED (or N/A when it could not be measured)."""
    status = "N/A" if holds is None else ("HOLDS" if holds else "MISSED")
    return {"target": target, "status": status, "measured": measured}


def print_verdicts(verdicts: Sequence[dict], echo=print) -> None:
    for v in verdicts:
        echo(f"  [{v['status']:>6}] {v['target']}: {v['measured']}")


def verdicts_md(verdicts: Sequence[dict]) -> str:
    lines = ["| target | status | measured |", "|---|---|---|"]
    lines += [f"| {v['target']} | **{v['status']}** | {v['measured']} |" for v in verdicts]
    return "\n".join(lines)


# --- tables ----------------------------------------------------------------------------------------
Column = tuple[str, Callable[[dict], object]]


def md_table(rows: Sequence[dict], columns: Sequence[Column]) -> str:
    head = "| " + " | ".join(h for h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = []
    for r in rows:
        cells = []
        for _, fn in columns:
            try:
                val = fn(r)
            except (KeyError, TypeError, ZeroDivisionError, ValueError):
                val = None
            cells.append("-" if val is None else str(val))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body])


def fmt(x: float | None, digits: int = 3) -> str | None:
    if x is None or x != x:
        return None
    if x == 0:
        return "0"
    ax = abs(x)
    if ax >= 100:
        return f"{x:,.0f}"
    if ax >= 1:
        return f"{x:.{max(digits - 1, 1)}f}".rstrip("0").rstrip(".") if ax < 10 else f"{x:.1f}"
    return f"{x:.{digits}g}"


def mb(nbytes: float | None) -> str | None:
    return None if nbytes is None else fmt(nbytes / 1e6)


def failures_md(failures: dict[str, str]) -> list[str]:
    """Lines naming each failed variant with the first line of its failure; none without failures."""
    if not failures:
        return []
    return ["", "Failed variants:", "", *(f"- `{k}`: {v.splitlines()[0]}" for k, v in failures.items())]


# --- accuracy curves -------------------------------------------------------------------------------
def reach(run: dict, threshold: float, key: str):
    """``key`` (seconds, bytes) at the first point of ``run['curve']`` with accuracy >= ``threshold``;
    None if the run never gets there."""
    for p in run["curve"]:
        if p["accuracy"] >= threshold:
            return p[key]
    return None


def mean_curve(runs: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
    """(mean ``key``, mean accuracy) per curve point over ``runs`` (seeds), cut to the shortest curve."""
    n = min(len(r["curve"]) for r in runs)
    xs = [statistics.mean(r["curve"][i][key] for r in runs) for i in range(n)]
    ys = [statistics.mean(r["curve"][i]["accuracy"] for r in runs) for i in range(n)]
    return xs, ys


# --- files -----------------------------------------------------------------------------------------
def command_line(script: str, argv: Sequence[str] | None = None) -> str:
    """The command that reproduces this run from the repository root: ``python -m benchmarks.<name> ...``
    for the benchmark module whose file is ``script``."""
    module = os.path.relpath(os.path.abspath(script), os.path.dirname(HERE))[:-len(".py")].replace(os.sep, ".")
    args = ["-m", module, *(sys.argv[1:] if argv is None else argv)]
    return "python " + " ".join(shlex.quote(a) for a in args)


def environment() -> dict:
    import torch
    return {"date": _dt.datetime.now().isoformat(timespec="seconds"), "python": platform.python_version(),
            "torch": torch.__version__, "cpus": os.cpu_count(), "machine": platform.machine(),
            "kernel": platform.release()}


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text.rstrip() + "\n")


def update_readme(section: str, text: str, readme: str = README) -> bool:
    """Replace the README block ``section``; False (README untouched) if its markers are absent."""
    if not os.path.exists(readme):
        return False
    with open(readme) as f:
        doc = f.read()
    pattern = re.compile(rf"(<!-- BEGIN {re.escape(section)} -->\n).*?(<!-- END {re.escape(section)} -->)", re.S)
    if not pattern.search(doc):
        return False
    # The text is written for results/<name>.md: its relative links (plots) are relative to results/.
    text = re.sub(r"\]\((?![a-z]+:|/|#|results/)([^)]+)\)", lambda m: f"](results/{m.group(1)})", text)
    doc = pattern.sub(lambda m: m.group(1) + text.rstrip() + "\n" + m.group(2), doc)
    with open(readme, "w") as f:
        f.write(doc)
    return True


def is_default_out(out: str) -> bool:
    return os.path.abspath(out) == os.path.abspath(RESULTS)


def publish(out: str, name: str, title: str, result: dict, text: str) -> None:
    """``<out>/<name>.json`` and ``<name>.md``; the README block ``name`` when ``out`` is the default."""
    write_json(os.path.join(out, f"{name}.json"), result)
    write_text(os.path.join(out, f"{name}.md"), f"# {title}\n\n" + text)
    if is_default_out(out):
        update_readme(name, text)


def publish_measurements(out: str, name: str, title: str, script: str, argv: Sequence[str] | None, rows: list[dict],
                         columns: Sequence[Column], verdicts: list[dict], conditions: str = "",
                         explanation: str = "", extra: dict | None = None) -> dict:
    """Publish a one-table benchmark: ``{command, environment, rows, verdicts, **extra}`` as ``<name>.json``,
    and ``<name>.md``: the command with the date and ``conditions``, the table, ``explanation``, the verdicts."""
    result = {"command": command_line(script, argv), "environment": environment(), "rows": rows,
              "verdicts": verdicts, **(extra or {})}
    text = (f"Command: `{result['command']}` ({result['environment']['date']}{conditions})\n\n"
            + md_table(rows, columns) + "\n\n" + (explanation + "\n\n" if explanation else "") + verdicts_md(verdicts))
    publish(out, name, title, result, text)
    return result


def print_result(result: dict, columns: Sequence[Column], out: str, name: str) -> None:
    """The table, the verdicts and the files written (``<name>.md``, ``.json`` and the plots)."""
    print()
    print(md_table(result["rows"], columns))
    print()
    print_verdicts(result["verdicts"])
    print(f"\nwrote {out}/{name}.md, {name}.json" + "".join(f", {os.path.basename(p)}" for p in result["plots"]))


def save_figure(plt, fig, out: str, fname: str) -> str:
    """Lay out, write ``<out>/<fname>`` (110 dpi) and close ``fig``; returns the path."""
    fig.tight_layout()
    path = os.path.join(out, fname)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- plots -----------------------------------------------------------------------------------------
def pyplot():
    """matplotlib with the file-only backend, or None (and a hint) when it is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("matplotlib is missing: no plots written (install it: pip install matplotlib, "
              "or pip install -e '.[bench]')", file=sys.stderr)
        return None
