"""Fuzz of every file reader: masks, checkpoints, task diffs, CIFAR-10 batches, GLUE TSVs.

Each reader gets a real file of its kind cut short at several points, random bytes of several
sizes, an empty file, a real file of ANOTHER kind, and a folder. Every case must end in a
ValueError (a FileNotFoundError only for a missing file) whose message names the file: never an
exception of the parser underneath (safetensors, pickle, torch, codecs), which would reach the
user as a traceback.
"""
from __future__ import annotations

import pickle
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsecomm import Mask, checkpoint, diff, random_mask

from sparsecomm.app import models
from sparsecomm.app.tasks import cifar10, glue


def model():
    torch.manual_seed(0)
    return models.mlp(8, 8, 1, 3)


def write_valid(kind: str, path: Path) -> None:
    """A real, readable file of ``kind`` at ``path``."""
    m = model()
    if kind == "mask":
        random_mask(m, density=0.5, seed=1).save(path)
    elif kind == "checkpoint":
        path.write_bytes(checkpoint.encode({"model": m.state_dict(), "step": 3}))
    elif kind == "diff":
        base, tuned = model(), model()
        mask = random_mask(base, density=0.5, seed=1)
        with torch.no_grad():
            for name, p in tuned.named_parameters():
                p.add_(mask[name].to(p.dtype))  # changed inside the mask only, as masked training does
        diff.save(tuned, base, mask, path)
    elif kind == "cifar":
        rng = np.random.default_rng(0)
        with open(path, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3]}, f)
    elif kind == "glue":
        path.write_text("sentence\tlabel\na fine film\t1\na dull one\t0\n")


def read(kind: str, path: Path):
    if kind == "mask":
        return Mask.load(path, model())
    if kind == "checkpoint":
        return checkpoint.decode(path.read_bytes() if path.is_file() else b"", str(path))
    if kind == "diff":
        return diff.apply(model(), path)
    if kind == "cifar":
        return cifar10.read_batch(path)
    return glue.read_tsv(path, glue.TASKS["sst2"])


KINDS = ["mask", "checkpoint", "diff", "cifar", "glue"]


def damaged_files(kind: str, d: Path) -> list[tuple[str, Path]]:
    valid = d / f"valid.{kind}"
    write_valid(kind, valid)
    read(kind, valid)  # the reader reads a good file
    data = valid.read_bytes()
    out = []
    for frac in (0.0, 0.1, 0.5, 0.9, 0.99):
        p = d / f"cut{frac}"
        p.write_bytes(data[: int(len(data) * frac)])
        out.append((f"truncated at {frac:.0%}", p))
    rng = random.Random(kind)
    for n in (1, 8, 100, 5000):
        p = d / f"random{n}"
        p.write_bytes(bytes(rng.randrange(256) for _ in range(n)))
        out.append((f"{n} random bytes", p))
    for other in KINDS:
        if other != kind:
            p = d / f"other.{other}"
            write_valid(other, p)
            out.append((f"a {other} file", p))
    folder = d / "a-folder"
    folder.mkdir()
    out.append(("a folder", folder))
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_every_damaged_or_foreign_file_is_one_clear_error(kind, tmp_path):
    outcomes = {}
    for what, path in damaged_files(kind, tmp_path):
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                got = read(kind, path)
            # A TSV is lines: cut mid-row, it still holds whole rows, and the reader must say it skipped the
            # cut one; cut after the last row (its final newline), it is the whole file.
            skipped = kind == "glue" and what.startswith("truncated") and any("skipped" in str(w.message) for w in caught)
            whole = kind == "glue" and got == read(kind, tmp_path / "valid.glue")
            outcomes[what] = "read, warned" if skipped else ("read, whole" if whole else "read")
        except (ValueError, FileNotFoundError) as e:
            assert str(path) in str(e) or path.name in str(e), f"{kind}, {what}: {e}"
            assert "\n" not in str(e).strip(), f"{kind}, {what}: not one line: {e}"
            outcomes[what] = "error"
    # Nothing damaged or foreign passes as a file of this kind (an empty GLUE TSV is no examples: an error too).
    assert set(outcomes.values()) <= {"error", "read, warned", "read, whole"}, outcomes


def test_a_missing_file_names_it(tmp_path):
    for kind in KINDS:
        path = tmp_path / f"missing.{kind}"
        with pytest.raises((FileNotFoundError, ValueError), match="missing"):
            read(kind, path)


def test_a_pickle_that_runs_code_is_refused_not_executed(tmp_path):
    """CIFAR-10 batches are pickles: one that names another callable is refused before it runs."""
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}))
    with pytest.raises(ValueError, match="not a CIFAR-10 python batch"):
        cifar10.read_batch(path)
    assert not (tmp_path / "pwned").exists()
