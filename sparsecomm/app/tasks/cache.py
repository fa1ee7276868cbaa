"""A task's prepared arrays kept on disk, so that a worker loads them instead of preparing them again.

Preparing a split can cost more than the data: scikit-learn's digits need ``import sklearn`` (about a
second of CPU, scipy included) in every worker of every run. :func:`cached_arrays` keeps the prepared
arrays in one ``.npz`` per key under the cache folder:

    $SPARSECOMM_CACHE_DIR, else $XDG_CACHE_HOME/sparsecomm, else ~/.cache/sparsecomm

The key names everything the arrays depend on (library versions included), so a changed input is a new
file, never a stale one. The global rank 0 alone writes (atomically, as checkpoints are: a reader
sees the old file, the new one, or none); the other ranks prepare the arrays themselves until
it exists. A file that cannot be read or does not pass the caller's check is prepared again and
replaced; a folder that cannot be written only means no cache.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch.distributed as dist

from sparsecomm.checkpoint import write_atomic

from ..launch import env_rank

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


def cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The folder for cached arrays (see the module doc for the variables it reads)."""
    environ = os.environ if environ is None else environ
    if environ.get("SPARSECOMM_CACHE_DIR"):
        return Path(environ["SPARSECOMM_CACHE_DIR"]).expanduser()
    if environ.get("XDG_CACHE_HOME"):
        return Path(environ["XDG_CACHE_HOME"]).expanduser() / "sparsecomm"
    return Path.home() / ".cache" / "sparsecomm"


def _global_rank() -> int:
    """This process's global rank: the process group's if one is up, else the launcher's, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return env_rank() or 0


def cache_path(name: str, key: Mapping) -> Path:
    """``<cache dir>/<name>-<hash of key>.npz``; ``key`` is JSON-serialisable."""
    digest = hashlib.sha256(json.dumps(dict(key), sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / f"{name}-{digest}.npz"


def _read(path: Path, valid: Callable[[Arrays], bool]) -> tuple[Arrays | None, str | None]:
    """(the arrays, None) from a good file; (None, what is wrong) from a bad one; (None, None) if none."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        return None, None
    except Exception as e:  # truncated, not a zip, unreadable
        return None, f"cannot be read ({type(e).__name__}: {e})"
    return (arrays, None) if valid(arrays) else (None, "are not the arrays expected")


def _write(path: Path, arrays: Arrays) -> None:
    """``arrays`` as ``path`` (:func:`sparsecomm.checkpoint.write_atomic`); a write that fails leaves no cache."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    try:
        write_atomic(str(path), buffer.getvalue())
    except OSError as e:
        log.debug("no cache for %s: %s", path, e)


def cached_arrays(name: str, key: Mapping, prepare: Callable[[], Arrays],
                  valid: Callable[[Arrays], bool] = lambda arrays: True) -> Arrays:
    """The arrays ``prepare()`` returns for ``key``: read from the cache when a valid file is there,
    else prepared (and, on global rank 0, written for the next process)."""
    path = cache_path(name, key)
    arrays, problem = _read(path, valid)
    if arrays is not None:
        return arrays
    writer = _global_rank() == 0
    if problem and writer:
        log.warning("cached arrays %s %s: preparing them again and replacing the file", path, problem)
    arrays = prepare()
    if writer:
        _write(path, arrays)
    return arrays
