"""Global top-k over many tensors, streamed in bounded chunks: never one n-sized vector.

The order is total: entry ``a`` ranks before ``b`` if ``value_a > value_b``, or if the values are
equal and ``a`` comes first in the concatenation of the flattened sources (its *position*). The
selection is the first ``k`` entries of that order, which is exactly what a ``torch.topk`` over
the concatenation gives when the k-th largest value ``T`` is found and the entries ``> T`` plus
the first ``k - #(> T)`` entries ``== T`` (by position) are kept; so identical values give
identical selections on every rank.

How: the sources are written, in position order, into one reused float64 chunk of at most
``chunk_numel`` entries; ``reduce`` (e.g. a cross-rank all-reduce) runs on the chunk in place;
the chunk's entries that can still enter the top k are merged with the at most ``k`` candidates
kept so far. Once ``k`` candidates are held, an entry must be strictly greater than the smallest
of them to enter (an equal one comes later by position and so ranks after it), so most chunks
add nothing.

Memory (``C = chunk_numel``, ``k`` entries selected):
    the chunk: ``8 C`` bytes (float64), plus at most ``~24 C`` bytes of transient work
    (``torch.topk`` inside a chunk, bool and index vectors);
    the candidates: ``16 k`` bytes (float64 value + int64 position) held, fewer than ``32 k``
    pending, ``~100 k`` at most while merging.
Nothing proportional to the number of entries ``n`` is allocated, except the bool bits of the
final mask (``n`` bytes) built by :func:`positions_to_bits`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

#: Default chunk: 1 Mi entries = 8 MiB of float64.
DEFAULT_CHUNK_NUMEL = 1 << 20

Writer = Callable[[torch.Tensor, int], None]
"""``write(out, lo)`` fills ``out`` (1-D float64) with the source's flat entries ``lo .. lo + len(out)``."""


def first_k(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (int64, ascending) of the first ``k`` entries of ``values`` in (value desc, index asc) order.

    ``values``: 1-D, any floating dtype, no NaN, ``0 < k <= len(values)``. The k-th largest value
    ``T`` comes from ``torch.topk``; entries ``> T`` are kept, then entries ``== T`` in index order
    until there are ``k``. Allocates O(len(values)).
    """
    threshold = torch.topk(values, k, sorted=False).values.min()
    sel = values > threshold
    need = k - int(sel.sum())
    if need > 0:
        ties = (values == threshold).nonzero().reshape(-1)[:need]
        sel[ties] = True
    return sel.nonzero().reshape(-1)


class StreamingTopK:
    """The first ``k`` entries (value desc, position asc) of values that arrive in position order.

    Call :meth:`add` with consecutive 1-D float64 pieces; :attr:`positions` is the answer
    (int64, ascending). Holds at most ``k`` merged candidates plus fewer than ``2k`` pending
    ones (16 bytes each: float64 value, int64 position).
    """

    def __init__(self, k: int, device: torch.device | str = "cpu"):
        if k < 0:
            raise ValueError(f"k={k} must be >= 0")
        self.k = int(k)
        self._values = torch.empty(0, dtype=torch.float64, device=device)
        self._positions = torch.empty(0, dtype=torch.int64, device=device)
        self._threshold: torch.Tensor | None = None  # the k-th value once k candidates are held
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._pending_n = 0
        self.next_position = 0

    def add(self, chunk: torch.Tensor, start: int) -> None:
        """Take in ``chunk`` (1-D float64, no NaN) whose first entry has position ``start``.

        Pieces must come in position order (``start`` >= the end of the previous piece); the
        chunk may be a reused buffer: nothing of it is kept by reference.
        """
        if start < self.next_position:
            raise ValueError(f"pieces must arrive in position order: got start {start} after {self.next_position}")
        self.next_position = start + chunk.numel()
        if self.k == 0 or chunk.numel() == 0:
            return
        if self._threshold is not None:
            # Only entries strictly above the k-th value held can still enter: an equal one comes
            # later by position than every held candidate. (The threshold only rises, so one that
            # is stale while candidates are pending lets more through, never fewer.)
            idx = (chunk > self._threshold).nonzero().reshape(-1)
            if idx.numel() == 0:
                return
            if idx.numel() > self.k:
                idx = idx[first_k(chunk[idx], self.k)]
        elif chunk.numel() > self.k:
            idx = first_k(chunk, self.k)
        else:
            idx = torch.arange(chunk.numel(), device=chunk.device)
        self._pending.append((chunk[idx], idx + start))
        self._pending_n += idx.numel()
        if self._threshold is None or self._pending_n >= self.k:
            self._merge()

    def _merge(self) -> None:
        """Fold the pending candidates into the held ones, keeping the first k (position order kept)."""
        if not self._pending:
            return
        values = torch.cat([self._values, *(v for v, _ in self._pending)])
        positions = torch.cat([self._positions, *(p for _, p in self._pending)])
        self._pending, self._pending_n = [], 0
        if values.numel() > self.k:  # held candidates precede the pending ones in position order
            keep = first_k(values, self.k)
            values, positions = values[keep], positions[keep]
        self._values, self._positions = values, positions
        if values.numel() >= self.k:
            self._threshold = values.min()

    @property
    def positions(self) -> torch.Tensor:
        """int64 positions of the top k so far, ascending."""
        self._merge()
        return self._positions


def stream_topk(sources: Iterable[tuple[int, Writer]], k: int, *, device: torch.device | str = "cpu",
                chunk_numel: int = DEFAULT_CHUNK_NUMEL,
                reduce: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Positions (int64, ascending, on ``device``) of the global top ``k`` of the concatenated sources.

    ``sources`` yields ``(numel, write)`` pairs in position order; each ``write`` is called, in
    order, for consecutive pieces of its source, before the next source is drawn from the
    iterable (so a generator may interleave other work, e.g. advance an RNG). Several sources
    share one chunk. ``reduce(chunk)`` (optional) transforms each filled float64 chunk in place
    before ranking, e.g. ``dist.all_reduce``: it is called the same number of times with the same
    sizes on every rank. Raises ValueError if a value is NaN (even when ``k`` is 0).

    Memory: one float64 chunk of ``min(chunk_numel, n)`` entries plus O(k) (see the module doc).
    """
    if chunk_numel < 1:
        raise ValueError(f"chunk_numel={chunk_numel} must be >= 1")
    top = StreamingTopK(k, device)
    buf = None
    fill = start = 0

    def flush() -> None:
        nonlocal fill, start
        if fill == 0:
            return
        chunk = buf[:fill]
        if reduce is not None:
            reduce(chunk)
        if torch.isnan(chunk).any():
            raise ValueError("scores contain NaN: the model or the loss produced non-finite gradients")
        top.add(chunk, start)
        start += fill
        fill = 0

    for numel, write in sources:
        lo = 0
        while lo < numel:
            if buf is None:
                buf = torch.empty(chunk_numel, dtype=torch.float64, device=device)
            m = min(numel - lo, chunk_numel - fill)
            write(buf[fill:fill + m], lo)
            fill += m
            lo += m
            if fill == chunk_numel:
                flush()
    flush()
    return top.positions


def copy_writer(tensor: torch.Tensor) -> Writer:
    """A writer that copies ``tensor``'s flat entries (converted to float64) into the chunk."""
    flat = tensor.detach().reshape(-1)  # a view when contiguous; a copy of this one tensor otherwise

    def write(out: torch.Tensor, lo: int) -> None:
        out.copy_(flat[lo:lo + out.numel()])

    return write


def positions_to_bits(positions: torch.Tensor, shapes: Sequence[torch.Size]) -> list[torch.Tensor]:
    """Split ascending global ``positions`` over tensors of ``shapes`` (back to back): CPU bool tensors.

    Allocates the bits themselves (one byte per entry) and O(k).
    """
    positions = positions.cpu()
    out, offset = [], 0
    for shape in shapes:
        m = 1
        for s in shape:
            m *= int(s)
        lo, hi = torch.searchsorted(positions, torch.tensor([offset, offset + m])).tolist()
        bits = torch.zeros(m, dtype=torch.bool)
        bits[positions[lo:hi] - offset] = True
        out.append(bits.reshape(shape))
        offset += m
    return out
