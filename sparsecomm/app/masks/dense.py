"""``mask=dense``: no mask; plain DDP all-reduces all n gradient entries every step."""
from __future__ import annotations

from .base import MaskKind


class DenseKind(MaskKind):
    name = "dense"
    dense = True
