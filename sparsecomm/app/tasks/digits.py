"""scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes) with ``small_cnn``.

The embedded default task: no download, trains to ~98% test accuracy in under a minute on CPU.
Items: ``(x, y)`` with x (1, 8, 8) float32 in [0, 1] and y int64 in [0, 10).
"""
from __future__ import annotations

from importlib.metadata import version

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .. import models
from .cache import Arrays, cached_arrays
from .common import Task, cross_entropy

SPLIT = ("x_train", "y_train", "x_test", "y_test")
IMAGES = 1797


def split(test_fraction: float, seed: int) -> Arrays:
    """scikit-learn's stratified split of its digits: ``SPLIT``'s four arrays (x scaled to [0, 1])."""
    from sklearn.datasets import load_digits  # imported here: a cached split needs no scikit-learn
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]  # pixel values 0..16
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=seed)
    return dict(zip(SPLIT, (x_tr, y_tr, x_te, y_te)))


def _is_split(a: Arrays) -> bool:
    return (set(a) == set(SPLIT) and a["x_train"].dtype == np.float32 and a["y_train"].dtype == np.int64
            and a["x_train"].shape[1:] == a["x_test"].shape[1:] == (1, 8, 8)
            and len(a["x_train"]) == len(a["y_train"]) and len(a["x_test"]) == len(a["y_test"])
            and len(a["y_train"]) + len(a["y_test"]) == IMAGES)


def load(test_fraction: float = 0.2, seed: int = 0):
    """Deterministic stratified split -> (x_train, y_train, x_test, y_test) tensors.

    x: (N, 1, 8, 8) float32 in [0, 1]; y: (N,) int64. Same ``seed`` -> same split on every rank.
    The split is cached on disk (:mod:`.cache`), keyed by the versions of scikit-learn and numpy.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"task.test_fraction={test_fraction} must lie in (0, 1), e.g. task.test_fraction=0.2")
    key = {"test_fraction": float(test_fraction), "seed": int(seed),
           "scikit-learn": version("scikit-learn"), "numpy": np.__version__}
    arrays = cached_arrays("digits", key, lambda: split(test_fraction, seed), _is_split)
    return tuple(torch.from_numpy(arrays[k]) for k in SPLIT)


def build(test_fraction: float = 0.2, seed: int = 0) -> Task:
    """Digits task: 1,437 train / 360 test examples (default split), ``small_cnn`` (149,938 params)."""
    x_tr, y_tr, x_te, y_te = load(test_fraction, seed)
    return Task(name="digits", model=models.small_cnn(10), train_set=TensorDataset(x_tr, y_tr),
                test_set=TensorDataset(x_te, y_te), loss_fn=cross_entropy, head=list(models.HEAD),
                num_classes=10)
