"""Fresh virtual environments that already hold this machine's torch (tests/test_wheel.py, tests/test_docker.py).

pip installing torch unpacks about 750 MB: the longest step of every fresh environment. The
environment running the tests holds that install already (``make setup``: ``pip install torch==X``),
so :func:`torch_env` (a session fixture in conftest.py) is a fresh environment holding hard links to
it: torch and the distributions it requires, pip, with their ``.dist-info``, and their console
scripts rewritten for the fresh interpreter. :func:`seed` gives every fresh environment a test makes
the same links from there. pip then sees exactly what ``pip install torch==X`` would have left, and
installs everything else (the wheel's other dependencies, the app itself) from scratch.

    make_venv(path, seed_from=torch_env)   # python -m venv --without-pip path, then seed(path, torch_env)

The built wheel is installed once the same way, with every dependency it declares resolved by pip
(:func:`install`, the ``wheel_env`` fixture); the Dockerfile replays seed from that environment
less the app (``leave_out=APP_NAMES``), so their ``pip install .`` installs the app alone.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# The CPU torch this machine has on disk, so pip never chooses a CUDA build for ``torch>=2.3``.
TORCH_PIN = f"torch=={torch.__version__.split('+')[0]}"


def site_packages(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python3*/site-packages"))
    assert len(found) == 1, f"{venv}: expected one lib/python3*/site-packages, found {found}"
    return found[0]


def requirement_closure(*names: str) -> list[metadata.Distribution]:
    """The installed distributions ``names`` and every one they require, transitively (markers
    evaluated for this interpreter, no extras)."""
    found: dict[str, metadata.Distribution] = {}
    todo = list(names)
    while todo:
        key = canonicalize_name(todo.pop())
        if key in found:
            continue
        found[key] = dist = metadata.distribution(key)
        for text in dist.requires or ():
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return [found[k] for k in sorted(found)]


def torch_env(venv: Path) -> Path:
    """``venv`` created (``python -m venv --without-pip``), holding this environment's torch, the
    distributions it requires and pip, linked: what ``pip install torch==X`` leaves in a fresh
    environment (the source :func:`seed` links from)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    dists = requirement_closure("torch", "pip")
    files = [str(f) for d in dists for f in d.files or ()]
    names = {f.split("/")[0] for f in files if not f.startswith("..")}
    scripts = {f.rsplit("/", 1)[1] for f in files if f.startswith("../") and "/bin/" in f}
    source = Path(sys.prefix)
    here = site_packages(source)
    elsewhere = [d.name for d in dists if Path(d.locate_file("")) != here]
    assert not elsewhere, f"{elsewhere}: not installed in this environment ({source}), so not linked from it"
    seed(venv, source, only=names | scripts)
    return venv


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system: a copy does the same job, slower
        shutil.copy2(src, dst)


# What the app itself installs: its package, its .dist-info, its console scripts.
APP_NAMES = ("sparsecomm",)


def seed(venv: Path, source: Path, leave_out: tuple[str, ...] = (), only: set[str] | None = None) -> list[str]:
    """Give ``venv`` (fresh) every package of ``source`` it lacks, but those whose name starts with one
    of ``leave_out`` and, if ``only`` is given, those it does not name (site-packages entries and
    console scripts); the names added, sorted.

    Packages are hard links (a copy across file systems), their byte code included, as pip compiled
    it when it installed them (a link keeps the source's mtime, so the byte code stays valid; without
    it every process of the fresh environment compiles torch again: 2.7 s for ``import torch``
    against 1.3 s); console scripts are rewritten so that their ``#!`` line names ``venv``'s own
    interpreter.
    """
    src_site, dst_site = site_packages(source), site_packages(venv)
    have = set(os.listdir(dst_site))
    wanted = (lambda name: name in only) if only is not None else (lambda name: True)
    added = sorted(n for n in os.listdir(src_site)
                   if n not in have and n != "__pycache__" and not n.startswith(leave_out) and wanted(n))
    for name in added:
        src = src_site / name
        if src.is_dir() and not src.is_symlink():
            shutil.copytree(src, dst_site / name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(src), str(dst_site / name))
    # the byte code of the one-file modules added (site-packages/__pycache__/<module>.cpython-3X.pyc)
    modules = {n[:-3] for n in added if n.endswith(".py")}
    pycs = [p for p in sorted((src_site / "__pycache__").glob("*.pyc")) if p.name.split(".")[0] in modules]
    if pycs:
        (dst_site / "__pycache__").mkdir(exist_ok=True)
    for pyc in pycs:
        _link_or_copy(str(pyc), str(dst_site / "__pycache__" / pyc.name))
    python = venv / "bin" / "python"
    for script in sorted((source / "bin").iterdir()):
        target = venv / "bin" / script.name
        if target.exists() or script.is_symlink() or not script.is_file() or script.name.startswith(leave_out) \
                or not wanted(script.name):
            continue
        lines = script.read_bytes().split(b"\n", 1)
        if lines[0].startswith(b"#!") and len(lines) == 2:
            target.write_bytes(b"#!" + str(python).encode() + b"\n" + lines[1])
            target.chmod(0o755)
    return added


def outside_env(bin_dir: Path) -> dict[str, str]:
    """This process's environment as a fresh shell would have it, ``bin_dir`` first on ``PATH``:
    no virtual environment or ``PYTHONPATH`` of the checkout, no launcher's rank variables."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith(("TORCHELASTIC_", "SLURM_"))}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return env


def make_venv(path: Path, seed_from: Path, leave_out: tuple[str, ...] = ()) -> Path:
    """A fresh virtual environment at ``path``, seeded from ``seed_from``: ``python -m venv
    --without-pip``, then pip comes with the other packages (the same pip ``ensurepip`` installs,
    linked instead of unpacked: 3 s less per environment)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=300)
    added = seed(path, seed_from, leave_out)
    assert any(n.startswith("torch-") and n.endswith(".dist-info") for n in added), added
    assert (path / "bin" / "pip").exists(), f"{seed_from} has no pip to seed {path} with"
    return path


def build(tree: Path, out: Path) -> dict[str, Path]:
    """``python -m build`` of ``tree`` into ``out`` (the wheel from the sdist, as pip does):
    ``{"wheel": path, "sdist": path}``."""
    proc = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(tree)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheels, sdists = list(out.glob("*.whl")), list(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(os.listdir(out))
    return {"wheel": wheels[0], "sdist": sdists[0]}


def install(wheel: Path, venv: Path, torch_env: Path) -> Path:
    """A fresh virtual environment at ``venv`` holding ``wheel`` and the dependencies it declares
    (pip resolves them; torch is there already, seeded from ``torch_env``)."""
    make_venv(venv, seed_from=torch_env)
    proc = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel), TORCH_PIN],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return venv
