"""CIFAR-10 from the standard python-pickle release (``cifar-10-python.tar.gz``, extracted) with a
CIFAR ResNet.

``data_dir`` holds ``data_batch_1`` .. ``data_batch_5`` and ``test_batch`` (or a
``cifar-10-batches-py/`` folder holding them). Each pickle is a dict with ``b"data"``:
(10000, 3072) uint8, rows laid out R, G, B planes of 32x32, and ``b"labels"``: 10000 ints.
Items: ``(x, y)`` with x (3, 32, 32) float32 normalised per channel, y int64 in [0, 10).
"""
from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .. import models
from .common import Task, cross_entropy, require_dir

MEAN = (0.4914, 0.4822, 0.4465)  # per-channel statistics of the CIFAR-10 training set
STD = (0.2470, 0.2435, 0.2616)
ARCHS = {"resnet18": models.resnet18, "resnet34": models.resnet34}
_EXAMPLE = "/data/cifar-10-batches-py (extracted from cifar-10-python.tar.gz)"


def find_batches(data_dir) -> tuple[list[Path], Path]:
    """(train batch files, test batch file) under ``data_dir`` or ``data_dir/cifar-10-batches-py``."""
    root = require_dir(data_dir, "CIFAR-10's data_batch_1..5 and test_batch", _EXAMPLE)
    for d in (root, root / "cifar-10-batches-py"):
        train = sorted(d.glob("data_batch_[0-9]*"))
        if train or (d / "test_batch").exists():
            break
    if not train or not (d / "test_batch").exists():
        raise ValueError(f"task.data_dir={str(data_dir)!r} holds no CIFAR-10 python batches (need data_batch_1..5 "
                         f"and test_batch, in it or in its cifar-10-batches-py/): download and extract "
                         f"https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and set task.data_dir={_EXAMPLE}")
    if len(train) < 5:
        warnings.warn(f"{d} holds only {len(train)} of CIFAR-10's 5 training batches; training on those")
    return train, d / "test_batch"


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles what a CIFAR-10 batch holds (dicts, lists, bytes, NumPy arrays) and nothing else:
    a pickle naming any other class is refused instead of executed."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR-10 batch never holds")
        return super().find_class(module, name)


def read_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One pickle -> x (N, 3, 32, 32) uint8, y (N,) int64; any unreadable file is one ValueError naming it."""
    fix = f"re-extract cifar-10-python.tar.gz and point task.data_dir at the folder, e.g. {_EXAMPLE}"
    try:
        with open(path, "rb") as f:
            d = _BatchUnpickler(f, encoding="bytes").load()
        data, labels = d[b"data"], d[b"labels"]
        x = torch.from_numpy(np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32))
        y = torch.as_tensor(labels, dtype=torch.int64)
    except OSError as e:
        raise ValueError(f"task.data_dir: cannot read {path} ({e.strerror}); {fix}") from None
    except Exception as e:  # noqa: BLE001 - any failure to parse the file means it is not a CIFAR-10 batch
        reason = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise ValueError(f"task.data_dir: {path} is not a CIFAR-10 python batch ({type(e).__name__}: {reason}); "
                         f"{fix}") from None
    if y.ndim != 1 or len(x) != len(y) or (len(y) and (y.min() < 0 or y.max() > 9)):
        raise ValueError(f"task.data_dir: {path} holds {len(x)} images and {len(y)} labels; a CIFAR-10 batch has "
                         f"as many labels as images, each in 0..9; {fix}")
    return x, y


class CIFAR10(Dataset):
    """Images kept as uint8 (150 MB for the train set); normalised (and augmented) per item.

    ``augment``: random 32x32 crop of the 4-pixel zero-padded image and a random horizontal flip,
    drawn from torch's global RNG (DataLoader workers seed it per worker).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, augment: bool = False):
        self.x, self.y, self.augment = x, y, augment
        self.mean = torch.tensor(MEAN).view(3, 1, 1)
        self.std = torch.tensor(STD).view(3, 1, 1)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        x = (self.x[i].float() / 255.0 - self.mean) / self.std
        if self.augment:
            x = torch.nn.functional.pad(x, (4, 4, 4, 4))  # zero = the mean colour after normalising
            r, c = torch.randint(0, 9, (2,)).tolist()
            x = x[:, r:r + 32, c:c + 32]
            if torch.rand(()) < 0.5:
                x = x.flip(2)
        return x, self.y[i]


def build(data_dir=None, arch: str = "resnet18", augment: bool = True) -> Task:
    """CIFAR-10 task: 50,000 train / 10,000 test images, ResNet-18 (11.2M) or ResNet-34 (21.3M)."""
    if arch not in ARCHS:
        raise ValueError(f"task.arch={arch!r} is not known: use one of {sorted(ARCHS)}, e.g. task.arch=resnet18")
    train_files, test_file = find_batches(data_dir)
    xs, ys = zip(*(read_batch(p) for p in train_files))
    x_te, y_te = read_batch(test_file)
    return Task(name="cifar10", model=ARCHS[arch](10),
                train_set=CIFAR10(torch.cat(xs), torch.cat(ys), augment=augment),
                test_set=CIFAR10(x_te, y_te), loss_fn=cross_entropy, head=list(models.HEAD), num_classes=10)
