"""Tasks stored as sparse diffs against one shared base model.

A model fine-tuned with a fixed mask differs from its base only at the mask's ``k`` entries
(the masked optimizers leave every other entry bit-identical). :func:`save` stores just those::

    sparsecomm.diff.save(model, base, mask, "sst2.diff.safetensors")   # ~k x (2 + 4) bytes + header
    model = sparsecomm.diff.apply(base, "sst2.diff.safetensors")        # bit-exact, a new module
    sparsecomm.diff.size_report("sst2.diff.safetensors")                # diff bytes vs full model

File layout (safetensors, format ``sparsecomm-diff-v2``): per parameter with selected entries,
``<name>::gaps`` (uint8: the ascending flat positions as LEB128 varints of their gaps, the first
position itself, then ``position - previous - 1``: 7 bits a byte, the high bit set on every byte
but a number's last, so a gap under 128 takes 1 byte, under 16,384 2 bytes, ...) and
``<name>::values`` (the FINE-TUNED values at those positions, in the parameter's dtype: not
differences, since ``base + (tuned - base)`` need not round back to ``tuned`` in floating point,
and :func:`apply` must be bit-exact). At 0.5% density the gaps average 200: about 2 bytes an
entry instead of v1's 8-byte int64 index. Persistent buffers that changed (BatchNorm running
statistics, ...) are stored whole as ``<name>::buffer``: they are not trained through the mask,
they are small, and without them the rebuilt model would not be the fine-tuned one. Metadata:
format version, the SHA-256 of the base weights (every parameter and persistent buffer: name,
dtype, shape, bytes), the mask's digest, the SHA-256 of the stored tensors (corruption check)
and the full model's size (for :func:`size_report`). Files of format ``sparsecomm-diff-v1``
(``<name>::indices``, int64 flat positions) are still read.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Mapping

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from .checkpoint import read_safetensors, write_atomic
from .mask import Mask, _unwrap

DIFF_FORMAT = "sparsecomm-diff-v2"
READ_FORMATS = ("sparsecomm-diff-v1", DIFF_FORMAT)
_SEP = "::"


class BaseMismatch(ValueError):
    """The diff was made against other base weights than the ones it is applied to."""


class LossyDiff(ValueError):
    """The fine-tuned model changed entries outside the mask: a sparse diff cannot hold them."""


# --- hashing -------------------------------------------------------------------------------------

def _as_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(parameters, persistent buffers) by name; tied parameters once, under their first name."""
    sd_keys = set(model.state_dict().keys())
    params = dict(model.named_parameters())
    buffers = {n: b for n, b in model.named_buffers() if n in sd_keys}
    return params, buffers


def base_hash(model: nn.Module) -> str:
    """Hex SHA-256 over the sorted names, dtypes, shapes and raw bytes of every parameter and
    persistent buffer: the identity of a base model, independent of device."""
    params, buffers = _state(_unwrap(model))
    h = hashlib.sha256()
    _hash_into(h, params, "param:")
    _hash_into(h, buffers, "buffer:")
    return h.hexdigest()


def _tensors_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    _hash_into(h, tensors)
    return h.hexdigest()


def _hash_into(h, tensors: Mapping[str, torch.Tensor], prefix: str = "") -> None:
    """Feed ``prefix name:dtype:shape`` and the raw bytes of each tensor, by sorted name, to ``h``."""
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{prefix}{name}:{str(t.dtype)}:{list(t.shape)}\n".encode())
        h.update(_as_bytes(t))


def _bits_differ(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Entry-wise "not the same bits" (so -0.0 vs 0.0 and NaN payloads count as changes)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    if a.dtype.is_floating_point and a.element_size() in ints:
        return a.view(ints[a.element_size()]) != b.view(ints[b.element_size()])
    return a != b


def _check_same_layout(model: dict, base: dict, what: str) -> None:
    fix = "save needs the fine-tuned model and the base it started from (same architecture)"
    if set(model) != set(base):
        diff = sorted(set(model) ^ set(base))
        raise ValueError(f"model and base have different {what}s (first difference: {diff[0]!r}); {fix}")
    for n, t in model.items():
        if t.shape != base[n].shape or t.dtype != base[n].dtype:
            raise ValueError(f"{what} {n!r} is {t.dtype}{tuple(t.shape)} in the model but "
                             f"{base[n].dtype}{tuple(base[n].shape)} in the base; {fix}")


# --- positions as varint gaps ---------------------------------------------------------------------

def encode_positions(positions: torch.Tensor) -> torch.Tensor:
    """Ascending int64 ``positions`` -> uint8 LEB128 varints of their gaps (see the module doc)."""
    positions = positions.to(torch.int64).reshape(-1)
    if positions.numel() == 0:
        return torch.empty(0, dtype=torch.uint8)
    gaps = positions.clone()
    gaps[1:] = positions[1:] - positions[:-1] - 1
    if (gaps < 0).any():
        raise ValueError("positions must be strictly ascending and >= 0")
    nbytes = torch.ones_like(gaps)
    for j in range(1, 9):  # int64 gaps < 2^63: at most 9 bytes of 7 bits
        nbytes += (gaps >= (1 << (7 * j))).to(torch.int64)
    owner = torch.repeat_interleave(torch.arange(gaps.numel()), nbytes)
    start = torch.cumsum(nbytes, 0) - nbytes
    j = torch.arange(owner.numel()) - start[owner]
    out = (gaps[owner] >> (7 * j)) & 0x7F
    out |= (j < nbytes[owner] - 1).to(torch.int64) << 7
    return out.to(torch.uint8)


def decode_positions(data: torch.Tensor, count: int, numel: int) -> torch.Tensor:
    """uint8 varint gaps -> ``count`` ascending int64 positions, each < ``numel``.

    Raises ValueError (one line, no location: the caller names the file) when the bytes do not
    decode to exactly that: a number cut off, too many or too few numbers, one too large.
    """
    if data.dtype != torch.uint8 or data.dim() != 1:
        raise ValueError(f"position gaps must be a 1-D uint8 tensor, got {data.dtype}{tuple(data.shape)}")
    if data.numel() == 0:
        if count:
            raise ValueError(f"no position gaps for {count} values")
        return torch.empty(0, dtype=torch.int64)
    b = data.to(torch.int64)
    last = (b & 0x80) == 0
    if not bool(last[-1]):
        raise ValueError("the position gaps end inside a number")
    found = int(last.sum())
    if found != count:
        raise ValueError(f"the position gaps hold {found} numbers for {count} values")
    ends = last.nonzero().reshape(-1)
    start = torch.cat([torch.zeros(1, dtype=torch.int64), ends[:-1] + 1])
    owner = torch.cumsum(last.to(torch.int64), 0) - last.to(torch.int64)
    j = torch.arange(b.numel()) - start[owner]
    if int(j.max()) * 7 >= 63:
        raise ValueError("a position gap is longer than 9 bytes")
    gaps = torch.zeros(count, dtype=torch.int64).scatter_add_(0, owner, (b & 0x7F) << (7 * j))
    if bool((gaps >= numel).any()):
        raise ValueError(f"a position gap reaches past the parameter's {numel} entries")
    positions = torch.cumsum(gaps + 1, 0) - 1
    if int(positions[-1]) >= numel:
        raise ValueError(f"a position reaches past the parameter's {numel} entries")
    return positions


# --- save / apply --------------------------------------------------------------------------------

def save(model: nn.Module, base: nn.Module, mask: Mask, path: str | os.PathLike) -> dict:
    """Write ``model``'s changes against ``base`` at the entries ``mask`` selects; returns the metadata.

    Refuses (:class:`LossyDiff`) when ``model`` differs from ``base`` in any bit outside the
    mask, naming the first such parameter: the file would silently not rebuild ``model``.
    ``model`` and ``base`` may be DDP-wrapped. Writes atomically (temp file + rename).
    """
    model, base = _unwrap(model), _unwrap(base)
    mask.validate(base)
    m_params, m_bufs = _state(model)
    b_params, b_bufs = _state(base)
    _check_same_layout(m_params, b_params, "parameter")
    _check_same_layout(m_bufs, b_bufs, "buffer")

    tensors: dict[str, torch.Tensor] = {}
    for name, p in m_params.items():
        changed = _bits_differ(p, b_params[name])
        outside = changed & ~mask[name]
        if outside.any():
            n_out = int(outside.sum())
            first = outside.reshape(-1).nonzero()[0].item()
            raise LossyDiff(
                f"parameter {name!r} differs from the base at {n_out} entries outside the mask "
                f"(first at flat index {first}); a sparse diff would lose them. Train with the "
                f"masked optimizer (MaskedAdamW/MaskedSGD with this mask) so unselected entries stay "
                f"bit-identical, or save with a mask that covers every changed entry")
        idx = mask.flat_indices(name)
        if idx.numel():
            tensors[f"{name}{_SEP}gaps"] = encode_positions(idx)
            tensors[f"{name}{_SEP}values"] = p.detach().cpu().contiguous().reshape(-1)[idx].clone()
    for name, b in m_bufs.items():
        if b.shape != b_bufs[name].shape or _bits_differ(b, b_bufs[name]).any():
            tensors[f"{name}{_SEP}buffer"] = b.detach().cpu().contiguous().clone()

    full_bytes = sum(t.numel() * t.element_size() for t in (*m_params.values(), *m_bufs.values()))
    meta = {
        "format": DIFF_FORMAT,
        "base_sha256": base_hash(base),
        "mask_digest": mask.digest(),
        "tensors_sha256": _tensors_hash(tensors),
        "num_selected": str(mask.num_selected),
        "numel": str(sum(p.numel() for p in m_params.values())),
        "full_model_bytes": str(full_bytes),
        "params": json.dumps(sorted(m_params)),
    }
    write_atomic(os.fspath(path), safetensors_bytes(tensors, metadata=meta))
    return meta


def _read(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    path = os.fspath(path)
    meta, tensors = read_safetensors(path, "diff file", "write it with sparsecomm.diff.save and fix the path")
    if meta.get("format") not in READ_FORMATS:
        raise ValueError(f"{path!r} is not a sparsecomm diff file (format {meta.get('format')!r}, "
                         f"expected one of {list(READ_FORMATS)})")
    if _tensors_hash(tensors) != meta.get("tensors_sha256"):
        raise ValueError(f"diff file {path!r} is corrupted: its contents do not match the hash in its header")
    return meta, tensors


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The header of a diff file (format, base_sha256, mask_digest, sizes), contents verified."""
    return _read(path)[0]


def apply(base: nn.Module, path: str | os.PathLike, *, inplace: bool = False) -> nn.Module:
    """Rebuild the fine-tuned model from ``base`` and the diff at ``path``, bit-exactly.

    Returns a NEW module (a deep copy of ``base`` with the diff written in), leaving ``base``
    untouched so several task diffs can be applied to one shared base; ``inplace=True`` writes
    into ``base`` itself and returns it (saves a copy of the model's memory; ``base`` is then
    the task model, and its hash no longer matches other diffs). Raises :class:`BaseMismatch`,
    naming the expected and actual base hashes, when ``base`` is not the model the diff was
    saved against.
    """
    meta, tensors = _read(path)
    base = _unwrap(base)
    actual = base_hash(base)
    expected = meta["base_sha256"]
    if actual != expected:
        raise BaseMismatch(
            f"diff {os.fspath(path)!r} was saved against base weights with sha256 {expected}, but the "
            f"model given as base has sha256 {actual}; apply it to the same pretrained model it was "
            f"fine-tuned from (same checkpoint, unmodified: a base already patched in place by "
            f"apply(..., inplace=True) no longer matches)")
    model = base if inplace else copy.deepcopy(base)
    params, buffers = _state(model)
    with torch.no_grad():
        for key, t in tensors.items():
            name, _, kind = key.rpartition(_SEP)
            if kind in ("indices", "gaps"):
                p = params.get(name)
                values = tensors.get(f"{name}{_SEP}values")
                if p is None or values is None or values.dim() != 1:
                    raise ValueError(f"diff file {os.fspath(path)!r} is damaged: {key!r} has no matching "
                                     f"parameter or values; save it again with sparsecomm.diff.save")
                if kind == "gaps":
                    try:
                        t = decode_positions(t, values.numel(), p.numel())
                    except ValueError as e:
                        raise ValueError(f"diff file {os.fspath(path)!r} is damaged: {key!r}: {e}; save it "
                                         f"again with sparsecomm.diff.save") from None
                elif t.dim() != 1 or t.numel() != values.numel() or (t.numel() and (
                        int(t.min()) < 0 or int(t.max()) >= p.numel())):
                    raise ValueError(f"diff file {os.fspath(path)!r} is damaged: {key!r} does not index "
                                     f"{name!r}; save it again with sparsecomm.diff.save")
                flat = p.data.view(-1) if p.data.is_contiguous() else p.data.contiguous().view(-1)
                flat[t.to(p.device)] = values.to(device=p.device, dtype=p.dtype)
                if flat.data_ptr() != p.data.data_ptr():
                    p.data.copy_(flat.view(p.shape))
            elif kind == "buffer":
                buffers[name].copy_(t.to(buffers[name].device))
    return model


def size_report(path: str | os.PathLike) -> dict[str, float]:
    """Bytes of the diff file vs the full model it rebuilds.

    Keys: ``file_bytes`` (on disk, header included), ``index_bytes`` (v2: the varint gaps; v1:
    the int64 indices), ``value_bytes``,
    ``buffer_bytes``, ``full_model_bytes`` (every parameter and persistent buffer of the model,
    raw), ``ratio`` (file / full), ``num_selected``, ``numel``.
    """
    meta, tensors = _read(path)

    def nbytes(kind):
        return sum(t.numel() * t.element_size() for k, t in tensors.items() if k.endswith(_SEP + kind))

    file_bytes = os.path.getsize(path)
    full = int(meta["full_model_bytes"])
    return {
        "file_bytes": file_bytes,
        "index_bytes": nbytes("indices") + nbytes("gaps"),
        "value_bytes": nbytes("values"),
        "buffer_bytes": nbytes("buffer"),
        "full_model_bytes": full,
        "ratio": file_bytes / full if full else float("nan"),
        "num_selected": int(meta["num_selected"]),
        "numel": int(meta["numel"]),
    }
