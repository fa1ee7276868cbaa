"""The built distributions, installed as a user installs them.

The wheel and the sdist are built from a copy of the tree (``python -m build``: the wheel from the
sdist, as pip does). Their file lists must carry every module under ``sparsecomm/`` and every file
of ``conf/`` (the latter as ``sparsecomm/conf/``), so a new subpackage or config group can never be
left out again. The wheel is then installed, with its declared dependencies, into a fresh virtual
environment (not editable) and run from a folder outside the checkout: ``--version``, ``--check``
and a short default job. The fresh environment gets torch as hard links to one pip install of it
(tests/freshenv.py): pip installs everything else the wheel declares. The wheel and that environment
are session fixtures (conftest.py): the Dockerfile replays reuse them (tests/test_docker.py).
"""
from __future__ import annotations

import json
import re
import subprocess
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest
from freshenv import outside_env

# One worker builds the environments they share (conftest.py: dists, wheel_env): pip and python -m build, minutes.
pytestmark = [pytest.mark.xdist_group("freshenv"), pytest.mark.timeout(1800)]
REPO = Path(__file__).resolve().parents[1]


def _tree_files(root: Path) -> set[str]:
    """Every file below ``root`` (relative, '/'-separated), caches left out."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith(".pyc")}


def _version() -> str:
    text = (REPO / "sparsecomm" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


def test_version_is_written_once():
    """pyproject.toml takes the version from the package: one string, in ``sparsecomm/__init__.py``."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "sparsecomm.__version__"}


@pytest.mark.slow
def test_wheel_carries_every_module_and_config(dists):
    version = _version()
    assert dists["wheel"].name == f"sparsecomm-{version}-py3-none-any.whl"
    with zipfile.ZipFile(dists["wheel"]) as zf:
        names = set(zf.namelist())
        entry_points = zf.read(f"sparsecomm-{version}.dist-info/entry_points.txt").decode()
    shipped = {n for n in names if not n.startswith(f"sparsecomm-{version}.dist-info/")}
    expected = {f"sparsecomm/{f}" for f in _tree_files(REPO / "sparsecomm")}
    expected |= {f"sparsecomm/conf/{f}" for f in _tree_files(REPO / "conf")}
    assert shipped == expected, (f"missing from the wheel: {sorted(expected - shipped)}; "
                                 f"in the wheel but not the tree: {sorted(shipped - expected)}")
    assert any(n.startswith("sparsecomm/app/masks/") for n in shipped)  # the package once left out
    assert re.search(r"^sparsecomm-train\s*=\s*sparsecomm\.app\.train:main$", entry_points, re.M)


@pytest.mark.slow
def test_sdist_carries_the_tree(dists):
    version = _version()
    prefix = f"sparsecomm-{version}/"
    with tarfile.open(dists["sdist"]) as tf:
        names = {m.name[len(prefix):] for m in tf.getmembers() if m.isfile()}
    expected = {f"sparsecomm/{f}" for f in _tree_files(REPO / "sparsecomm")}
    expected |= {f"conf/{f}" for f in _tree_files(REPO / "conf")}
    expected |= {"pyproject.toml", "setup.py", "README.md"}
    assert expected <= names, f"missing from the sdist: {sorted(expected - names)}"


def _run(venv: Path, cwd: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=cwd, env=outside_env(venv / "bin"), capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_installed_wheel_runs_outside_the_checkout(wheel_env, tmp_path):
    installed = wheel_env
    app = str(installed / "bin" / "sparsecomm-train")
    where = _run(installed, tmp_path, str(installed / "bin" / "python"), "-c",
                 "import sparsecomm, sparsecomm.app.trainer, sparsecomm.conf; print(sparsecomm.__file__)")
    assert where.returncode == 0, where.stderr[-2000:]
    assert Path(where.stdout.strip()).is_relative_to(installed), where.stdout  # the wheel's copy, not the tree's

    version = _run(installed, tmp_path, app, "--version")
    assert version.returncode == 0 and version.stdout.strip() == f"sparsecomm {_version()}", version

    check = _run(installed, tmp_path, app, "--check")
    assert check.returncode == 0 and check.stdout.startswith("ok: config checked"), check.stdout + check.stderr

    job = _run(installed, tmp_path, app, "steps=30", "schedule.dense_steps=5", "eval_every=0",
               "logging.progress=false", "run_id=wheel", timeout=600)
    assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "wheel"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = [r for r in records if r["event"] == "summary"][-1]
    assert summary["steps"] == 30 and summary["world_size"] == 2 and 0.0 <= summary["test_acc"] <= 1.0
    assert summary["k"] == round(0.005 * summary["numel"])  # the default FISH mask's density
    masked = [r for r in records if r["event"] == "train" and r["step"] > 10]
    assert masked and all(r["bytes_per_step"] == 4 * summary["k"] for r in masked)  # k fp32 values a step
    assert (run_dir / "config.yaml").is_file() and (run_dir / "model.safetensors").is_file()
