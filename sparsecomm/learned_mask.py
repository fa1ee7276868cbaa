"""A mask that learns from training: local squared gradients, and a global top-k every R steps.

Backward computes every entry's gradient, masked or not; the masked hook then sends only the k
selected ones. :class:`LocalGradientSquares` keeps, per entry, the sum of this rank's squared
LOCAL gradients (read by a tensor hook before DDP's all-reduce sees them), while it is
``enabled``: nothing extra crosses the network during training. :func:`refresh_mask` turns the
sums into a new mask at a refresh, with dynamic sparse training's drop/grow limit:

1. the global top ``k`` of the scores summed over ranks, by the exact candidate exchange of
   :func:`sparsecomm.topk.sum_topk` (per rank and round: an all-gather of ``W x 2k`` int32
   candidate positions and a float64 all-reduce of the scores at their union, about 3-4 MB for
   MiniLM at 0.5% on 2 ranks; the full ``n x 8``-byte sum only if its certificate fails);
2. entries the top k gains (``grow``) and loses (``drop``) against the current mask, equally
   many; one float64 all-reduce of the summed scores at those ``|grow| + |drop|`` positions
   (``8`` bytes each, ``2 (W-1)/W`` of that on a ring);
3. at most ``floor(max_change x k)`` swaps: the highest-scoring grow entries replace the
   lowest-scoring drop entries, pair by pair, and only while the grown entry's summed score is
   strictly larger than the dropped one's (equal scores keep the current mask).

Every decision uses all-reduced numbers, so every rank builds the same mask (checked by digest).
Names matching ``always`` stay whole and are never ranked. The new mask keeps k entries.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import distributed as sdist
from .mask import Mask, _unwrap, matches_any
from .topk import DEFAULT_CHUNK_NUMEL, _ring_allreduce_bytes, first_k, positions_to_bits, sum_topk, values_at


class LocalGradientSquares:
    """Per entry, the sum over enabled backward passes of this rank's squared local gradient.

    ``attach()`` registers one tensor hook per trainable parameter (it sees the gradient autograd
    computed on this rank, before DDP's bucket and hook); the hooks add ``g^2`` (float32) to
    :attr:`scores` only while :attr:`enabled`. Memory: one float32 tensor per parameter (4 bytes
    per entry). ``state_dict()`` holds the sums (CPU copies) and :attr:`passes`, so a resumed
    run refreshes exactly as an uninterrupted one.
    """

    def __init__(self, model: nn.Module):
        self.model = _unwrap(model)
        self.scores: dict[str, torch.Tensor] = {
            n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.model.named_parameters() if p.requires_grad}
        self.enabled = False
        self.passes = 0     # backward passes accumulated since the last reset
        self._handles: list = []
        self._counted = False

    def attach(self) -> "LocalGradientSquares":
        if not self._handles:
            params = dict(self.model.named_parameters())
            self._handles = [params[n].register_hook(self._adder(n)) for n in self.scores]
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _adder(self, name: str):
        def hook(grad: torch.Tensor) -> None:
            self.add(name, grad)
        return hook

    def add(self, name: str, grad: torch.Tensor) -> None:
        """Add ``grad**2`` (this rank's local gradient of parameter ``name``) while :attr:`enabled`;
        the first call after :meth:`begin_pass` counts a pass. For callers that see the local
        gradients themselves (a post-accumulate-grad hook) instead of :meth:`attach`."""
        if not self.enabled:
            return
        g = grad.to_dense() if grad.is_sparse else grad
        s = self.scores[name]
        if s.device != g.device:  # the model moved to its device after the sums were made
            s = self.scores[name] = s.to(g.device)
        s.add_(g.detach().float().pow(2))
        if not self._counted:
            self.passes += 1
            self._counted = True

    def begin_pass(self) -> None:
        """Call before each backward: the next hook call counts one pass."""
        self._counted = False

    def reset(self) -> None:
        for s in self.scores.values():
            s.zero_()
        self.passes = 0

    def state_dict(self, process_group=None) -> dict[str, Any]:
        """Collective: every rank's sums, gathered on rank 0 (the one that writes checkpoints).

        ``{"passes": int, "ranks": [flat float32 CPU tensor per rank]}`` on rank 0 (``W x n x 4``
        bytes there; over the network each other rank sends its ``n x 4`` bytes once), ``"ranks":
        None`` elsewhere. One process: its own sums.
        """
        flat = torch.cat([s.reshape(-1) for s in self.scores.values()]) if self.scores else torch.zeros(0)
        world = sdist.world_size(process_group)
        if world == 1:
            return {"passes": self.passes, "ranks": [flat.cpu().clone()]}
        main = sdist.rank(process_group) == 0
        parts = [torch.empty_like(flat) for _ in range(world)] if main else None
        dist.gather(flat, parts, dst=0, group=process_group)
        return {"passes": self.passes, "ranks": [p.cpu() for p in parts] if main else None}

    def load_state_dict(self, sd: Mapping[str, Any], process_group=None) -> None:
        """This rank's sums from :meth:`state_dict`'s output. Saved by another number of ranks,
        rank 0 takes the sum of all the saved ranks' sums and the others start at zero: the
        cross-rank sum a refresh ranks is the same (up to float32 rounding)."""
        ranks = sd["ranks"]
        world, rank = sdist.world_size(process_group), sdist.rank(process_group)
        if len(ranks) == world:
            flat = ranks[rank]
        else:
            flat = torch.stack(list(ranks)).sum(0) if rank == 0 else torch.zeros_like(ranks[0])
        numel = sum(s.numel() for s in self.scores.values())
        if flat.numel() != numel:
            raise ValueError(f"the saved gradient sums hold {flat.numel()} entries, the model {numel}: "
                             f"they were saved for another model")
        lo = 0
        for s in self.scores.values():
            s.copy_(flat[lo:lo + s.numel()].reshape(s.shape).to(device=s.device, dtype=s.dtype))
            lo += s.numel()
        self.passes = int(sd["passes"])


def _offsets(sizes: Iterable[int]) -> list[int]:
    out, total = [], 0
    for m in sizes:
        out.append(total)
        total += m
    return out


def refresh_mask(current: Mask, scores: Mapping[str, torch.Tensor], *, max_change: float,
                 always: Iterable[str] = (), process_group=None, chunk_numel: int = DEFAULT_CHUNK_NUMEL,
                 stats: dict | None = None) -> Mask:
    """The next mask: ``current`` moved towards the global top-k of ``scores`` summed over ranks,
    by at most ``floor(max_change x k)`` swaps (the module doc gives the rule and the bytes).

    ``scores``: this rank's non-negative scores, one per ranked name of ``current`` (names
    matching ``always`` are kept whole and need none). Collective. ``stats`` receives ``grown``
    (= dropped), ``wanted`` (swaps the top-k asked for), ``limit`` and ``bytes_sent`` (per rank:
    the candidate exchange plus the swap all-reduce) and ``exchange``.
    """
    if not 0.0 <= float(max_change) <= 1.0:
        raise ValueError(f"max_change={max_change} must be in [0, 1] (the fraction of k one refresh may change)")
    stats = {} if stats is None else stats
    always = tuple(always)
    ranked = [n for n in current if not matches_any(n, always)]
    absent = [n for n in ranked if n not in scores]
    if absent:
        raise ValueError(f"no scores for parameter {absent[0]!r} of the mask")
    tensors = [scores[n] for n in ranked]
    offsets = _offsets(current[n].numel() for n in ranked)
    held = torch.cat([current.flat_indices(n) + off for n, off in zip(ranked, offsets)]) if ranked \
        else torch.empty(0, dtype=torch.int64)
    k = held.numel()
    exchange: dict = {}
    device = tensors[0].device if tensors else torch.device("cpu")
    top = sum_topk(tensors, k, process_group=process_group, chunk_numel=chunk_numel, stats=exchange).cpu()
    grow = top[~torch.isin(top, held)]
    drop = held[~torch.isin(held, top)]
    limit = int(float(max_change) * k)
    swaps = 0
    spent = int(exchange.get("bytes_sent", 0))
    if grow.numel() and limit:
        both = torch.cat([grow, drop])
        order = torch.argsort(both)
        sums = torch.empty(both.numel(), dtype=torch.float64, device=device)
        sums[order] = values_at(tensors, both[order].to(device))
        if sdist.is_initialized() and sdist.world_size(process_group) > 1:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=process_group)
            spent += _ring_allreduce_bytes(sums.numel(), sdist.world_size(process_group))
        sums = sums.cpu()
        g_sums, d_sums = sums[:grow.numel()], sums[grow.numel():]
        n = min(limit, grow.numel())
        g_pick = first_k(g_sums, n)                       # highest first, ties by lower position
        g_pick = g_pick[torch.argsort(g_sums[g_pick], descending=True, stable=True)]
        d_pick = first_k(-d_sums, n)                      # lowest first, ties by lower position
        d_pick = d_pick[torch.argsort(d_sums[d_pick], stable=True)]
        better = g_sums[g_pick] > d_sums[d_pick]          # monotone: True, ..., True, False, ...
        swaps = int(better.sum())
        held = torch.cat([held[~torch.isin(held, drop[d_pick[:swaps]])], grow[g_pick[:swaps]]]).sort().values
    stats.update(grown=swaps, dropped=swaps, wanted=int(grow.numel()), limit=limit, bytes_sent=spent,
                 exchange=exchange.get("exchange", "local"))
    bits = dict(zip(ranked, positions_to_bits(held, [current[n].shape for n in ranked])))
    mask = Mask({n: (current[n] if n not in bits else bits[n]) for n in current})
    mask.assert_same_on_all_ranks(process_group)
    return mask
