"""The shared parameter mask: which entries of which parameters are trained and communicated.

A :class:`Mask` maps a parameter name (as in ``model.named_parameters()`` of the unwrapped
model, no ``module.`` prefix) to a bool tensor of that parameter's shape. Every rank holds the
same mask, so only the selected values ever travel; :meth:`Mask.digest` proves they agree.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from . import distributed as sdist

MASK_FORMAT = "sparsecomm-mask-v1"


class MaskMismatch(ValueError):
    """A mask does not fit a model (another architecture, another head size, ...)."""


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP / FSDP-style wrapper (anything with ``.module``)."""
    while isinstance(model, torch.nn.parallel.DistributedDataParallel) or (
        hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module)
    ):
        model = model.module
    return model


def check_density(density: float, field: str = "density") -> float:
    """Validate a keep ratio in (0, 1]; the error names ``field`` and the fix."""
    try:
        d = float(density)
    except (TypeError, ValueError):
        raise ValueError(f"{field}={density!r} is not a number; use a fraction in (0, 1], e.g. 0.005") from None
    if not (0.0 < d <= 1.0):
        raise ValueError(
            f"{field}={density!r} is outside (0, 1]: it is the fraction of entries kept, "
            f"e.g. {field}=0.005 keeps 0.5%"
        )
    return d


def count_for_density(density: float, numel: int, field: str = "density") -> int:
    """k = round(density x numel), refusing a density that selects no entry."""
    d = check_density(density, field)
    k = int(round(d * numel))
    if k < 1:
        raise ValueError(
            f"{field}={density} selects no entry of {numel} (k = round(density x {numel}) = 0); "
            f"use {field} >= {1.0 / numel:.3g}"
        )
    return min(k, numel)


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """Glob match (``fnmatch``) of a parameter name against ``patterns``, e.g. ``"fc.*"``."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


class Mask(Mapping[str, torch.Tensor]):
    """Parameter name -> bool tensor (CPU, parameter's shape). Immutable by convention."""

    def __init__(self, bits: Mapping[str, torch.Tensor]):
        self._bits: dict[str, torch.Tensor] = {}
        for name, b in bits.items():
            if not isinstance(b, torch.Tensor):
                raise TypeError(f"mask entry {name!r} is a {type(b).__name__}, expected a bool tensor")
            self._bits[name] = b.detach().to(device="cpu", dtype=torch.bool).contiguous()

    # Mapping protocol ------------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        return self._bits[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._bits)

    def __len__(self) -> int:
        return len(self._bits)

    def __repr__(self) -> str:
        return (f"Mask({len(self)} tensors, {self.num_selected}/{self.numel} selected, "
                f"density={self.density:.4g}, digest={self.digest()[:12]})")

    # Facts -----------------------------------------------------------------------------------
    @property
    def num_selected(self) -> int:
        return int(sum(int(b.sum()) for b in self._bits.values()))

    @property
    def numel(self) -> int:
        return int(sum(b.numel() for b in self._bits.values()))

    @property
    def density(self) -> float:
        return self.num_selected / max(self.numel, 1)

    def digest(self) -> str:
        """Hex SHA-256 over sorted names, shapes and the packed bits: equal masks, equal digests."""
        h = hashlib.sha256()
        for name in sorted(self._bits):
            b = self._bits[name]
            h.update(name.encode())
            h.update(json.dumps(list(b.shape)).encode())
            h.update(np.packbits(b.reshape(-1).numpy()).tobytes())
        return h.hexdigest()

    def flat_indices(self, name: str) -> torch.Tensor:
        """int64 positions of the selected entries in the flattened parameter, ascending."""
        return self._bits[name].reshape(-1).nonzero().reshape(-1)

    # Construction helpers --------------------------------------------------------------------
    @classmethod
    def full(cls, model: nn.Module, value: bool = True) -> "Mask":
        """Every entry selected (``value=True``, dense training) or none."""
        return cls({n: torch.full(p.shape, value, dtype=torch.bool) for n, p in _unwrap(model).named_parameters()})

    def union(self, other: "Mask") -> "Mask":
        self._check_same_layout(other)
        return Mask({n: self._bits[n] | other[n] for n in self._bits})

    def _check_same_layout(self, other: Mapping[str, torch.Tensor]) -> None:
        if set(self._bits) != set(other):
            missing = sorted(set(self._bits) ^ set(other))
            raise MaskMismatch(f"masks cover different parameters (first difference: {missing[0]!r})")

    # Checks ----------------------------------------------------------------------------------
    def validate(self, model: nn.Module) -> "Mask":
        """Raise :class:`MaskMismatch` naming the first parameter whose name or shape differs."""
        params = dict(_unwrap(model).named_parameters())
        fix = "the mask was made for another model: recompute it for this model or load the matching file"
        for name, p in params.items():
            if name not in self._bits:
                raise MaskMismatch(f"mask has no entry for parameter {name!r} of the model; {fix}")
            if tuple(self._bits[name].shape) != tuple(p.shape):
                raise MaskMismatch(
                    f"parameter {name!r} has shape {tuple(p.shape)} in the model but "
                    f"{tuple(self._bits[name].shape)} in the mask; {fix}"
                )
        for name in self._bits:
            if name not in params:
                raise MaskMismatch(f"mask entry {name!r} is not a parameter of the model; {fix}")
        return self

    def assert_same_on_all_ranks(self, process_group=None) -> None:
        """Collective: raise on every rank, listing all digests, unless all ranks hold this mask."""
        sdist.assert_same_on_all_ranks(
            self.digest(), "mask digest", process_group,
            fix="Every rank must build the mask from the same inputs (same seed, same summed scores).",
        )

    # Persistence -----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> str:
        """Write a safetensors file (bool tensors + digest in the metadata), atomically."""
        from safetensors.torch import save

        from .checkpoint import write_atomic

        digest = self.digest()
        write_atomic(os.fspath(path), save(dict(self._bits), metadata={"format": MASK_FORMAT, "digest": digest}))
        return digest

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None) -> "Mask":
        """Read a file written by :meth:`save`; verify its digest, and its fit to ``model`` if given."""
        from .checkpoint import read_safetensors

        path = os.fspath(path)
        meta, bits = read_safetensors(path, "mask file", "compute a mask first (or save one with Mask.save) and fix the path")
        if meta.get("format") != MASK_FORMAT:
            raise ValueError(f"{path!r} is not a sparsecomm mask file (format {meta.get('format')!r})")
        mask = cls(bits)
        if mask.digest() != meta.get("digest"):
            raise ValueError(f"mask file {path!r} is corrupted: its digest does not match its contents")
        if model is not None:
            mask.validate(model)
        return mask


def topk_mask(scores: Mapping[str, torch.Tensor], k: int, always: Iterable[str] = ()) -> Mask:
    """Global top-k over all score tensors; names matching ``always`` are kept whole.

    Deterministic under ties: entries equal to the k-th largest score are taken in order of
    their position in the concatenation of ``scores`` (insertion order), so identical scores
    give identical masks on every rank.
    """
    always = tuple(always)
    names = list(scores)
    kept_whole = [n for n in names if matches_any(n, always)]
    ranked = [n for n in names if n not in kept_whole]
    n_whole = sum(scores[n].numel() for n in kept_whole)
    total = sum(scores[n].numel() for n in names)
    if n_whole > k:
        raise ValueError(
            f"the parameters matching always={list(always)} hold {n_whole} entries, more than the "
            f"budget k={k} of {total}; raise the density to at least {n_whole / total:.3g} or narrow 'always'"
        )
    bits = {n: torch.ones(scores[n].shape, dtype=torch.bool) for n in kept_whole}
    k_rest = k - n_whole
    if ranked:
        flat = torch.cat([scores[n].detach().reshape(-1).to(torch.float64).cpu() for n in ranked])
        if torch.isnan(flat).any():
            raise ValueError("scores contain NaN: the model or the loss produced non-finite gradients")
        sel = torch.zeros(flat.numel(), dtype=torch.bool)
        if k_rest > 0:
            threshold = torch.topk(flat, k_rest, sorted=True).values[-1]
            sel = flat > threshold
            need = k_rest - int(sel.sum())
            ties = (flat == threshold).nonzero().reshape(-1)[:need]
            sel[ties] = True
        offset = 0
        for n in ranked:
            m = scores[n].numel()
            bits[n] = sel[offset:offset + m].reshape(scores[n].shape)
            offset += m
    return Mask({n: bits[n] for n in names})


def random_mask(model: nn.Module, *, density: float, seed: int = 0, always: Iterable[str] = ()) -> Mask:
    """Uniformly random mask with k = round(density x entries), identical on every rank for a seed.

    The FISH paper's baseline. Scores come from a CPU generator seeded with ``seed`` only, so no
    communication is needed for ranks to agree.
    """
    model = _unwrap(model)
    params = dict(model.named_parameters())
    k = count_for_density(density, sum(p.numel() for p in params.values()))
    gen = torch.Generator().manual_seed(int(seed))
    scores = {n: torch.rand(p.shape, generator=gen, dtype=torch.float64) for n, p in params.items()}
    return topk_mask(scores, k, always)
