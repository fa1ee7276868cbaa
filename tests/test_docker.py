"""Both Dockerfiles' own steps, replayed without a container engine.

Each Dockerfile is read and its instructions executed in order in a clean environment: a fresh
folder stands in for the image's file system (absolute paths such as ``/opt/sparsecomm`` and
``/runs`` are placed under it) and a fresh virtual environment for the base image's Python. ``ARG``
defaults apply, except ``TORCH_SPEC``, which names this machine's CPU torch (the Dockerfiles' wheel
indexes are not reachable from the test machine). ``RUN`` steps that only install the base's
Python with ``apt-get`` are the fresh virtual environment's job and are skipped; any instruction the
replay does not know fails the test, so a new step can never be skipped silently. Then the image's
``ENTRYPOINT`` runs: ``--version`` and a short default job (the CUDA image's default arguments
need a GPU, so its job runs on the CPU with ``cluster=local_cpu``).

Each virtual environment of the replay (the stand-in base Python, and any a ``RUN`` step creates)
holds, before the next step, hard links to the packages of the built wheel's environment less the
app itself (tests/freshenv.py: this machine's torch, and the wheel's other dependencies as pip
resolved them for tests/test_wheel.py). So the Dockerfile's ``pip install $TORCH_SPEC`` finds torch
installed, and ``pip install .`` builds and installs the app from the image's own copy of the tree.

What this does not check: the base images themselves, the CUDA build of torch, and pip's resolution
of the app's dependencies (the same ``pyproject.toml``: tests/test_wheel.py installs them from scratch).
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from freshenv import APP_NAMES, TORCH_PIN, make_venv, outside_env, seed

# each Dockerfile's steps replayed into a fresh venv: minutes; one worker builds the environments (conftest.py)
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("freshenv")]

REPO = Path(__file__).resolve().parents[1]
KNOWN = {"FROM", "ARG", "ENV", "WORKDIR", "COPY", "RUN", "ENTRYPOINT", "CMD"}
APT_ONLY = re.compile(r"^\s*(apt-get \S+.*|rm -rf /var/lib/apt/lists/\*)\s*$")
JOB = ["steps=20", "schedule.dense_steps=5", "eval_every=0", "logging.progress=false", "run_id=image"]


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, its argument text) per instruction; continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in dockerfile.read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


class Replay:
    """The image being built: its root folder, environment, working directory and entry point."""

    def __init__(self, root: Path, base_python: Path, packages: Path):
        self.root = root
        self.packages = packages
        self.venvs: set[Path] = set()
        self.args: dict[str, str] = {}
        self.env = outside_env(base_python)
        self.cwd = root
        self.entrypoint: list[str] = []
        self.cmd: list[str] = []
        self.skipped: list[str] = []

    def path(self, text: str) -> str:
        """``text`` with the image's absolute /opt and /runs paths placed under the root folder."""
        return re.sub(r"(?<![\w.])/(opt|runs)(?=/|\b)", lambda m: f"{self.root}/{m.group(1)}", text)

    def expand(self, text: str, extra: dict[str, str] | None = None) -> str:
        values = {**self.env, **self.args, **(extra or {})}
        return re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), ""), text)

    def step(self, word: str, rest: str, overrides: dict[str, str]) -> None:
        if word not in KNOWN:
            pytest.fail(f"the replay does not know the Dockerfile instruction {word} {rest}")
        if word == "FROM":
            return  # the fresh virtual environment stands in for the base image
        if word == "ARG":
            name, _, default = rest.partition("=")
            self.args[name] = overrides.get(name, " ".join(shlex.split(default)) if default else "")
        elif word == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                self.env[key] = self.path(self.expand(value))
        elif word == "WORKDIR":
            self.cwd = Path(self.path(self.expand(rest)))
            self.cwd.mkdir(parents=True, exist_ok=True)
        elif word == "COPY":
            *sources, dest = shlex.split(rest)
            target = self.cwd / dest
            for src in sources:  # Docker's rules: a folder's contents go into dest; files into a dest/ folder
                path = REPO / src
                if path.is_dir():
                    shutil.copytree(path, target, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
                elif dest.endswith("/") or len(sources) > 1:
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, target / path.name)
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, target)
        elif word == "RUN":
            commands = rest.split("&&")
            if all(APT_ONLY.match(c) for c in commands):
                self.skipped.append(rest)
                return
            script = self.path(self.expand(rest))
            proc = subprocess.run(["bash", "-ec", script], cwd=self.cwd, env=self.env, capture_output=True,
                                  text=True, timeout=1200)
            assert proc.returncode == 0, f"RUN {rest}\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
            self.seed_new_venvs()
        elif word == "ENTRYPOINT":
            self.entrypoint = json.loads(rest)
        elif word == "CMD":
            self.cmd = json.loads(rest)

    def seed_new_venvs(self) -> None:
        """Torch and the app's dependencies into every virtual environment a ``RUN`` step created."""
        for cfg in (c for pattern in ("*/pyvenv.cfg", "*/*/pyvenv.cfg", "*/*/*/pyvenv.cfg")
                    for c in self.root.glob(pattern)):
            if cfg.parent not in self.venvs:
                self.venvs.add(cfg.parent)
                seed(cfg.parent, self.packages, leave_out=APP_NAMES)

    def run(self, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
        return subprocess.run([*self.entrypoint, *args], cwd=self.cwd, env=self.env, capture_output=True,
                              text=True, timeout=timeout)


def build(dockerfile: Path, tmp_path: Path, packages: Path) -> Replay:
    """The image of ``dockerfile``, its Python environments seeded from ``packages`` less the app."""
    base = make_venv(tmp_path / "base-python", seed_from=packages, leave_out=APP_NAMES)
    image = Replay(tmp_path / "image", base / "bin", packages)
    image.root.mkdir()
    for word, rest in instructions(dockerfile):
        image.step(word, rest, {"TORCH_SPEC": TORCH_PIN})
    assert image.entrypoint == ["sparsecomm-train"], image.entrypoint
    return image


def test_instructions_are_read_from_the_files():
    """The parser sees each Dockerfile's install steps (a parser that finds nothing would pass)."""
    for name in ("Dockerfile.cpu", "Dockerfile.cuda"):
        words = [w for w, _ in instructions(REPO / "docker" / name)]
        assert words.count("RUN") >= 2 and "COPY" in words and "ENTRYPOINT" in words, (name, words)
        assert set(words) <= KNOWN, (name, set(words) - KNOWN)


@pytest.mark.timeout(1800)  # a fresh environment: pip installs torch and the app's dependencies
@pytest.mark.parametrize("name,job_args", [("Dockerfile.cpu", []), ("Dockerfile.cuda", ["cluster=local_cpu"])])
def test_dockerfile_steps_install_a_working_app(name, job_args, tmp_path, wheel_env):
    image = build(REPO / "docker" / name, tmp_path, wheel_env)
    where = subprocess.run(["python", "-c", "import sparsecomm.app.trainer, sparsecomm.conf; print(sparsecomm.__file__)"],
                           cwd=image.cwd, env=image.env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr[-2000:]
    assert Path(where.stdout.strip()).is_relative_to(tmp_path), f"imported the checkout, not the image: {where.stdout}"
    assert not (image.root / "opt" / "sparsecomm" / "build").exists(), "the image keeps its build folder"

    version = image.run("--version")
    assert version.returncode == 0 and version.stdout.startswith("sparsecomm "), version.stdout + version.stderr
    job = image.run(*job_args, *JOB)
    assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-3000:]
    summary = json.loads((image.cwd / "outputs" / "image" / "summary.json").read_text())
    assert summary["steps"] == 20 and 0.0 <= summary["test_acc"] <= 1.0, summary
