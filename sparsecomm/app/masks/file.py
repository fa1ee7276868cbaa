"""``mask=file``: a mask saved by an earlier run (``mask.safetensors``), checked against the
model at start: a mask of another model stops the run with the file and the fix."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from sparsecomm.mask import Mask

from ..config import ConfigError
from .base import MaskKind, Setting


class FileKind(MaskKind):
    name = "file"

    def __init__(self, cfg: Mapping, setting: Setting):
        super().__init__(cfg, setting)
        path = str(cfg.path)
        try:
            self.mask = Mask.load(path, setting.model)
        except ValueError as e:
            raise ConfigError(f"mask.path={path!r}: {e}") from None
        self.k = self.mask.num_selected

    def build(self, model: torch.nn.Module) -> Mask:
        return self.mask
