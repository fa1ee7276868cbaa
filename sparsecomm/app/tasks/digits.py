"""scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes) with ``small_cnn``.

The embedded default task: no download, trains to ~98% test accuracy in under a minute on CPU.
Items: ``(x, y)`` with x (1, 8, 8) float32 in [0, 1] and y int64 in [0, 10).
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset

from .. import models
from .common import Task, cross_entropy


def load(test_fraction: float = 0.2, seed: int = 0):
    """Deterministic stratified split -> (x_train, y_train, x_test, y_test) tensors.

    x: (N, 1, 8, 8) float32 in [0, 1]; y: (N,) int64. Same ``seed`` -> same split on every rank.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"task.test_fraction={test_fraction} must lie in (0, 1), e.g. task.test_fraction=0.2")
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]  # pixel values 0..16
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=seed)
    return torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te), torch.from_numpy(y_te)


def build(test_fraction: float = 0.2, seed: int = 0) -> Task:
    """Digits task: 1,437 train / 360 test examples (default split), ``small_cnn`` (149,938 params)."""
    x_tr, y_tr, x_te, y_te = load(test_fraction, seed)
    return Task(name="digits", model=models.small_cnn(10), train_set=TensorDataset(x_tr, y_tr),
                test_set=TensorDataset(x_te, y_te), loss_fn=cross_entropy, head=list(models.HEAD),
                num_classes=10)
