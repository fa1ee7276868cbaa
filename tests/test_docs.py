"""The documents stay true to the code, cheaply.

* every relative link in the front page, the guides in ``docs/`` and the benchmark pages points to
  a file or folder of the repository;
* every ``sparsecomm-train`` command line they show (also through ``make train ARGS=...``, torchrun
  ``-m sparsecomm.app.train``, ``cluster/*.sh|sbatch`` and ``docker run <image>``) composes: its
  overrides name real groups, options and fields with values of the right type;
* a shown error transcript (``$ sparsecomm-train <args>`` followed by ``error: ...``) is what the
  app prints today, exit code 2;
* the front page's DDP script runs on 2 Gloo ranks and its hook sends exactly 4k bytes a step
  (k and n counted here from the script's layer sizes, not by the library);
* the front page stays under 200 lines.
"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from apptest import REPO, app_env, compose_app, error_lines, main_in_process
from sparsecomm.app.compose import check_keys

GUIDES = sorted((REPO / "docs").glob("*.md"))
COMMAND_DOCS = [REPO / "README.md", *GUIDES]
LINK_DOCS = [*COMMAND_DOCS, REPO / "ARCHITECTURE.md", REPO / "benchmarks" / "README.md",
             REPO / "benchmarks" / "results" / "README.md"]

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# Flags of sparsecomm-train that take no override (and the value --cfg takes).
FLAGS = {"--check", "--multirun", "-m", "--help", "--hydra-help", "--info", "--version"}
PLACEHOLDER = re.compile(r"<[^>]*>|\.\.\.")


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def links(doc: Path) -> list[str]:
    text = FENCE.sub("", doc.read_text())  # links inside code blocks are code, not links
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


@pytest.mark.parametrize("doc", LINK_DOCS, ids=rel)
def test_relative_links_resolve(doc):
    assert doc.exists(), f"{rel(doc)} is missing"
    missing = [t for t in links(doc) if not (doc.parent / t.split("#")[0]).exists()]
    assert not missing, f"{rel(doc)} links to files that do not exist: {missing}"


def test_readme_is_a_front_page():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) < 200, f"README.md has {len(lines)} lines; move detail into docs/"
    assert GUIDES, "docs/ holds no guide"


# --- command lines ---------------------------------------------------------------------------------


def command_lines(doc: Path) -> list[tuple[str, str | None]]:
    """(command, the error line printed after it or None) for every shell line of ``doc``."""
    text = doc.read_text()
    found: list[tuple[str, str | None]] = []
    for lang, body in FENCE.findall(text):
        if lang not in ("", "bash", "sh", "console"):
            continue
        lines = body.replace("\\\n", " ").splitlines()
        for i, line in enumerate(lines):
            line = line.strip()
            transcript = line.startswith("$ ")
            line = line[2:] if transcript else line
            nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
            found.append((line, nxt if transcript and nxt.startswith("error: ") else None))
    for span in INLINE.findall(FENCE.sub("", text)):
        found.append((span, None))
    return found


def app_overrides(line: str) -> list[str] | None:
    """The Hydra overrides ``line`` hands to sparsecomm-train, or None if it does not run the app."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:
        return None
    segments = [[]]
    for tok in tokens:
        if tok in ("&&", "||", ";", "|"):
            segments.append([])
        else:
            segments[-1].append(tok)
    for segment in segments:
        overrides = segment_overrides(segment)
        if overrides is not None:
            return overrides
    return None


def segment_overrides(tokens: list[str]) -> list[str] | None:
    """The overrides of one simple command (no ``&&``), or None if it does not run the app."""
    head, implied = None, []
    for i, tok in enumerate(tokens):
        name = tok.rsplit("/", 1)[-1]
        if name == "sparsecomm-train" or tok == "sparsecomm.app.train" or name == "torchrun_local.sh":
            head = i
        elif name == "slurm_train.sbatch":
            head, implied = i, ["cluster=slurm"]
        elif re.fullmatch(r"sparsecomm:\w+", tok) and "run" in tokens[:i]:
            head = i
        elif tok == "train" and i > 0 and tokens[i - 1] == "make":
            args = [t[len("ARGS="):] for t in tokens if t.startswith("ARGS=")]
            return shlex.split(args[0]) if args else []
        if head is not None:
            break
    if head is None:
        return None
    args, out = tokens[head + 1:], list(implied)
    skip = False
    for tok in args:
        if skip:
            skip = False
        elif tok == "--cfg":
            skip = True
        elif tok in FLAGS or tok.startswith("hydra") or PLACEHOLDER.search(tok):
            continue
        else:
            out.append(tok)
    return out


def commands() -> list[tuple[str, str, str | None]]:
    seen, found = set(), []
    for doc in COMMAND_DOCS:
        for line, error in command_lines(doc):
            overrides = app_overrides(line)
            if overrides is None or (line, error) in seen:
                continue
            seen.add((line, error))
            found.append((rel(doc), line, error))
    return found


COMMANDS = commands()


def test_the_documents_show_app_commands():
    """The extractor finds the commands (an extractor that finds none would pass everything)."""
    assert sum(error is None for _, _, error in COMMANDS) >= 10, COMMANDS
    assert any(error for _, _, error in COMMANDS), "no error transcript found"


def expand_sweeps(overrides: list[str]) -> list[list[str]]:
    """One override list per point of a ``--multirun`` sweep (``a=1,2``)."""
    points = [[]]
    for o in OverridesParser.create().parse_overrides(overrides):
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [None]
        key = o.get_key_element()
        points = [p + [o.input_line if v is None else f"{key}={v}"] for p in points for v in values]
    return points


@pytest.mark.parametrize("doc,line", [(d, line) for d, line, error in COMMANDS if error is None],
                         ids=lambda v: v if isinstance(v, str) and v.endswith(".md") else None)
def test_documented_command_composes(doc, line):
    for overrides in expand_sweeps(app_overrides(line)):
        try:
            cfg = compose_app(*overrides)
            check_keys(overrides, cfg)
        except Exception as e:  # noqa: BLE001  (the failure names the document and the line)
            pytest.fail(f"{doc}: `{line}` does not compose: {type(e).__name__}: {e}")


@pytest.mark.parametrize("doc,line,error", [c for c in COMMANDS if c[2]], ids=lambda v: None)
def test_documented_error_is_what_the_app_prints(doc, line, error, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, _, err = main_in_process(["--check", *app_overrides(line)], capsys)
    assert code == 2 and error_lines(err) == [error], f"{doc}: `{line}` now prints {err!r} (exit {code})"


# --- the front page's DDP script --------------------------------------------------------------------


def readme_script() -> str:
    scripts = [body for lang, body in FENCE.findall((REPO / "README.md").read_text()) if lang == "python"]
    assert len(scripts) == 1, "README.md should show one python script"
    return scripts[0]


@pytest.mark.slow  # four torchrun jobs of 2 workers, two at a time
def test_readme_ddp_script_runs_and_sends_k_values(tmp_path):
    """The README's script sends k values a step, and every launch of it exits 0: a rank that
    ends while a Gloo thread still drops the last step's work used to abort after the run
    (a failed job for torchrun, about one launch in five)."""
    script = readme_script()
    sizes = [tuple(map(int, m)) for m in re.findall(r"nn\.Linear\((\d+), (\d+)\)", script)]
    density = float(re.search(r"density=([0-9.]+)", script).group(1))
    steps = int(re.search(r"for step in range\((\d+)\)", script).group(1))
    n = sum(i * o + o for i, o in sizes)
    k = round(density * n)
    (tmp_path / "train_ddp.py").write_text(script)

    def launch(_):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               "train_ddp.py"], cwd=tmp_path, env=app_env(), capture_output=True, text=True,
                              timeout=240)
    with ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(launch, range(4)))
    for proc in procs:
        assert proc.returncode == 0, proc.stderr[-3000:]
        found = re.search(r"k=(\d+): sent (\d+) bytes, dense DDP (\d+)", proc.stdout)
        assert found, proc.stdout
        assert [int(g) for g in found.groups()] == [k, steps * 4 * k, steps * 4 * n]
