"""What every task shares: the :class:`Task` record, its loss, and the data folder check."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from sparsecomm.modelio import logits_of


@dataclass
class Task:
    name: str
    model: nn.Module              # on CPU, freshly initialised (or pretrained for glue)
    train_set: Dataset            # FULL training set; items (inputs, target); the trainer shards per rank
    test_set: Dataset
    loss_fn: Callable             # loss_fn(outputs, targets) -> mean cross-entropy over the batch
    head: list[str]               # glob patterns of the classifier-head parameter names (mask `always`)
    num_classes: int
    collate_fn: Callable | None = None
    lengths: list[int] | None = None   # per training example (e.g. tokens): batches group similar lengths


def cross_entropy(outputs, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of (B, C) logits (or an HF output) against (B,) int64 labels."""
    return nn.functional.cross_entropy(logits_of(outputs), targets)


def require_dir(data_dir, what: str, example: str) -> Path:
    """``data_dir`` as an existing directory, or an error naming ``task.data_dir`` and the fix."""
    if data_dir is None or str(data_dir).strip() in ("", "???"):
        raise ValueError(f"task.data_dir is not set: pass the folder holding {what}, "
                         f"e.g. task.data_dir={example}")
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"task.data_dir={str(data_dir)!r} does not exist or is not a folder: "
                                f"point task.data_dir at the folder holding {what}, e.g. task.data_dir={example}")
    return path
