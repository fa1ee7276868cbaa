"""How the library and the app call a model: keyword inputs for Hugging Face batches, and the
logits out of whatever the model returns."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def forward(model: torch.nn.Module, inputs: Any):
    """``model(**inputs)`` for keyword inputs (Hugging Face batches), else ``model(inputs)``."""
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def logits_of(outputs: Any) -> torch.Tensor:
    """``outputs.logits`` for Hugging Face model outputs, else ``outputs`` itself: (B, C)."""
    return outputs.logits if hasattr(outputs, "logits") else outputs
