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
from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from . import distributed as sdist
from .checkpoint import read_safetensors, write_atomic
from .topk import DEFAULT_CHUNK_NUMEL, copy_writer, positions_to_bits, stream_topk

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


def check_fraction(value: float, field: str, meaning: str, example: str) -> float:
    """``float(value)`` if it lies in (0, 1], else a ValueError naming ``field``, what the
    fraction means and an ``example`` setting."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{field}={value!r} is not a number; use a fraction in (0, 1], e.g. {example}") from None
    if not (0.0 < f <= 1.0):
        raise ValueError(f"{field}={value!r} is outside (0, 1]: it is {meaning}, e.g. {field}={example}")
    return f


def check_density(density: float, field: str = "density") -> float:
    """Validate a keep ratio in (0, 1]; the error names ``field`` and the fix."""
    return check_fraction(density, field, "the fraction of entries kept", "0.005 keeps 0.5%")


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
        self._positions: dict[str, torch.Tensor] = {}  # name -> flat_indices(name), filled on first use

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
        return int(sum(int(torch.count_nonzero(b)) for b in self._bits.values()))  # b.sum() would copy to int64

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
        """int64 positions of the selected entries in the flattened parameter, ascending (CPU).

        Computed once per parameter and shared: the hook's packing plans and the masked
        optimizers both read this layout (a mask is immutable)."""
        cached = self._positions.get(name)
        if cached is None:
            cached = self._positions[name] = self._bits[name].reshape(-1).nonzero().reshape(-1)
        return cached

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
        digest = self.digest()
        write_atomic(os.fspath(path), safetensors_bytes(dict(self._bits), metadata={"format": MASK_FORMAT, "digest": digest}))
        return digest

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None) -> "Mask":
        """Read a file written by :meth:`save`; verify its digest, and its fit to ``model`` if given."""
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


def topk_mask(scores: Mapping[str, torch.Tensor], k: int, always: Iterable[str] = (), *,
              reduce: Callable[[torch.Tensor], None] | None = None,
              chunk_numel: int = DEFAULT_CHUNK_NUMEL) -> Mask:
    """Global top-k over all score tensors; names matching ``always`` are kept whole.

    ``scores``: name -> tensor (any shape, floating dtype, any device). The entries of the names
    matching ``always`` are all selected and count toward ``k``; the other ``k - #always`` are the
    largest scores of the remaining tensors. Deterministic under ties: entries equal to the k-th
    largest score are taken in order of their position in the concatenation of the ranked
    tensors (insertion order of ``scores``), so identical scores give identical masks on every
    rank. Raises ValueError if a ranked score is NaN.

    ``reduce`` (optional) is applied in place to each float64 chunk of the ranked scores before
    ranking, e.g. a cross-rank all-reduce (:func:`sparsecomm.fisher_mask` passes one).

    Memory: the scores are read in chunks of ``chunk_numel`` entries (float64, on the scores'
    device: ``8 x chunk_numel`` bytes, 8 MiB by default) and never concatenated; the candidates
    for the top k take ``16 k`` to ``~100 k`` bytes; the returned bits ``n`` bytes (CPU). See
    :mod:`sparsecomm.topk`.
    """
    return _assemble(*select_topk(scores, k, always, reduce=reduce, chunk_numel=chunk_numel))


def select_topk(scores: Mapping[str, torch.Tensor], k: int, always: Iterable[str] = (), *,
                reduce: Callable[[torch.Tensor], None] | None = None,
                chunk_numel: int = DEFAULT_CHUNK_NUMEL,
                ranker: Callable[[list[torch.Tensor], int], torch.Tensor] | None = None,
                ) -> tuple[dict, list[str], torch.Tensor]:
    """:func:`topk_mask`'s selection without the bits: ``({name: shape}, names kept whole, positions)``.

    ``ranker(tensors, k) -> positions`` (optional) replaces the streamed top-k over the ranked
    tensors (``reduce`` is then unused): :func:`sparsecomm.fisher_mask` passes
    :func:`sparsecomm.topk.sum_topk`, the exact candidate exchange.

    ``positions`` (int64, ascending, on the scores' device) index the concatenation of the
    ranked (not kept whole) tensors. Holds no reference to ``scores`` afterwards, so a caller
    that drops its scores frees them before the n bytes of bits are built
    (:func:`sparsecomm.fisher_mask` does).
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
    positions = torch.empty(0, dtype=torch.int64)
    if ranked and ranker is not None:
        positions = ranker([scores[n] for n in ranked], k - n_whole)
    elif ranked:
        positions = stream_topk(((scores[n].numel(), copy_writer(scores[n])) for n in ranked), k - n_whole,
                                device=scores[ranked[0]].device, chunk_numel=chunk_numel, reduce=reduce)
    return {n: scores[n].shape for n in names}, kept_whole, positions


def _assemble(shapes: Mapping[str, torch.Size], kept_whole: list[str], positions: torch.Tensor) -> Mask:
    """The mask of :func:`select_topk`'s answer: bits of ``shapes`` (CPU bool, n bytes)."""
    ranked = [n for n in shapes if n not in kept_whole]
    bits = {n: torch.ones(shapes[n], dtype=torch.bool) for n in kept_whole}
    bits.update(zip(ranked, positions_to_bits(positions, [shapes[n] for n in ranked])))
    return Mask({n: bits[n] for n in shapes})


def random_mask(model: nn.Module, *, density: float, seed: int = 0, always: Iterable[str] = (),
                chunk_numel: int = DEFAULT_CHUNK_NUMEL) -> Mask:
    """Uniformly random mask with k = round(density x entries), identical on every rank for a seed.

    The FISH paper's baseline. Every entry of every parameter (``named_parameters()`` order) gets
    a float64 score drawn from ``torch.rand`` on a CPU generator seeded with ``seed`` only, so no
    communication is needed for ranks to agree; the top k are kept (ties by position), the
    parameters matching ``always`` whole (their draws are made and discarded, so the others'
    scores do not depend on ``always``).

    Memory: the scores are drawn in chunks of ``chunk_numel`` entries (``8 x chunk_numel``
    bytes) and never held whole; the top-k candidates take ``16 k`` to ``~100 k`` bytes; the returned bits
    ``n`` bytes. The draws are the very numbers ``torch.rand(p.shape, generator=gen,
    dtype=torch.float64)`` per parameter gave before chunking (CPU ``uniform_`` draws one 64-bit
    number per entry, serially), so a seed gives the same mask as in earlier versions.
    """
    model = _unwrap(model)
    params = dict(model.named_parameters())
    k = count_for_density(density, sum(p.numel() for p in params.values()))
    always = tuple(always)
    kept_whole = [n for n in params if matches_any(n, always)]
    n_whole = sum(params[n].numel() for n in kept_whole)
    if n_whole > k:
        total = sum(p.numel() for p in params.values())
        raise ValueError(
            f"the parameters matching always={list(always)} hold {n_whole} entries, more than the "
            f"budget k={k} of {total}; raise the density to at least {n_whole / total:.3g} or narrow 'always'"
        )
    gen = torch.Generator().manual_seed(int(seed))

    def draw(out: torch.Tensor, lo: int) -> None:
        out.uniform_(0.0, 1.0, generator=gen)

    def sources():
        scratch = None
        for name, p in params.items():
            if name in kept_whole:  # advance the generator past this parameter's draws, chunk by chunk
                left = p.numel()
                while left:
                    m = min(left, chunk_numel)
                    if scratch is None:
                        scratch = torch.empty(min(chunk_numel, p.numel()), dtype=torch.float64)
                    elif scratch.numel() < m:
                        scratch = torch.empty(m, dtype=torch.float64)
                    scratch[:m].uniform_(0.0, 1.0, generator=gen)
                    left -= m
            else:
                yield p.numel(), draw

    positions = stream_topk(sources(), k - n_whole, chunk_numel=chunk_numel)
    return _assemble({n: p.shape for n, p in params.items()}, kept_whole, positions)
