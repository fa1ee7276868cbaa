"""The masked all-reduce DDP communication hook.

Every rank holds the same :class:`~sparsecomm.Mask`, so the hook sends only the k selected
gradient values, packed contiguously, and never an index. Per step and rank it hands
``k x wire_bytes`` to all-reduce instead of ``n x 4`` (n = all entries); a ring all-reduce then
puts about ``2 (N-1)/N`` times that on the wire.

Usage::

    ddp = DistributedDataParallel(model)
    state = sparsecomm.register_masked_allreduce(ddp, mask, wire_dtype=torch.bfloat16)
    ...  # train as usual; state.stats() says what was sent and what dense DDP would have sent

Two ways to send (``fused``):

* ``fused=True`` (default): the hook packs each bucket's masked values as the bucket becomes
  ready and launches ONE all-reduce for all buckets when the last bucket arrives. At small k a
  collective's latency costs more than its bytes, so one collective a step wins (see
  ``benchmarks/``).
* ``fused=False``: one all-reduce per bucket that holds masked entries, overlapping with the rest
  of the backward pass, as DDP's default hook does.

Setting ``state.dense = True`` before a backward makes that step a plain averaged all-reduce of
the whole bucket (the "full" steps of core/full alternation); no re-registration is needed.

Memory (k = selected entries, on the buckets' device unless said): the hook's own memory is O(k).
It keeps one int64 index per bucket (8 bytes per selected entry, 8k in all), built from the
mask's per-parameter positions (:meth:`~sparsecomm.Mask.flat_indices`: computed once, on the
CPU, and shared with the masked optimizers, which index the same layout).
A masked step allocates, transiently, the packed values of each bucket (k x the gradient's
bytes), their concatenation when fused (k more) and the wire-dtype copy (k x wire bytes): about
12 bytes per selected entry for fp32. A dense step works in place on DDP's buckets. DDP's own
buckets (n x 4 bytes for fp32, the gradients themselves with ``gradient_as_bucket_view=True``)
are DDP's, not the hook's.
"""
# No `from __future__ import annotations`: DDP checks the hook's `bucket` annotation at runtime.

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .distributed import let_comm_threads_finish_at_exit
from .mask import Mask, MaskMismatch
from .packing import PackPlan, build_plan, pack, unpack_

_WIRE_DTYPES = {
    None: None, "fp32": None, "float32": None, torch.float32: None,
    "fp16": torch.float16, "float16": torch.float16, torch.float16: torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, torch.bfloat16: torch.bfloat16,
}


def resolve_wire_dtype(wire_dtype: Any) -> torch.dtype | None:
    """Map ``None|"fp32"|"fp16"|"bf16"`` (or torch dtypes) to the dtype packed values travel in."""
    try:
        return _WIRE_DTYPES[wire_dtype]
    except (KeyError, TypeError):
        raise ValueError(
            f"wire_dtype={wire_dtype!r} is not supported; use null (send in the gradient's dtype), "
            f"fp16 or bf16"
        ) from None


@dataclass
class _PendingBucket:
    """A bucket whose packed values wait for the step's fused all-reduce."""

    buffer: torch.Tensor
    plan: PackPlan
    packed: torch.Tensor
    future: torch.futures.Future


class HookStats(NamedTuple):
    """What the hook has done, led by torch's ``PowerSGDState.compression_stats()`` triple
    ``(rate, before, after)`` in bytes: ``dense_bytes / bytes_sent``, then both counts."""

    compress_rate: float  # dense_bytes / bytes_sent; 0 while nothing was sent
    dense_bytes: int  # what dense DDP (the buckets in the gradient's dtype) would have handed to all-reduce
    bytes_sent: int  # payload this rank handed to all-reduce
    steps: int  # synchronised backward passes
    plans: int  # packing plans held: one per DDP bucket seen (after DDP's rebuild, the number of buckets)
    plan_bytes: int  # memory the plans keep between steps: one int64 per selected entry


@dataclass
class MaskedAllReduceState:
    """Everything the hook needs and counts; the hook itself keeps no state of its own.

    It holds no module: what it needs of the model is captured when it is bound (each
    parameter's name by the identity of its tensor, each name's shape), and what it needs of
    DDP's buckets as one :class:`~sparsecomm.packing.PackPlan` per bucket. Nothing here refers
    back to the DDP wrapper that holds this state.

    Fields:
        mask: the shared mask (names of the unwrapped module's parameters).
        process_group: group to all-reduce over (``None``: the default group).
        wire_dtype: dtype the packed values travel in (``None``: the gradient's dtype).
        fused: one all-reduce per step for all buckets (True) or one per bucket (False).
        dense: when True, the next steps all-reduce whole buckets (full steps of core/full).
        bytes_sent: cumulative payload bytes this rank handed to all-reduce.
        dense_bytes: what dense DDP (fp32 buckets, one all-reduce each) would have handed over.
        steps: completed synchronised backward passes.
    """

    mask: Mask
    process_group: Any = None
    wire_dtype: torch.dtype | None = None
    fused: bool = True
    dense: bool = False
    bytes_sent: int = 0
    dense_bytes: int = 0
    steps: int = 0
    _names: dict = field(default_factory=dict, repr=False)  # id(parameter tensor) -> its name
    _shapes: dict = field(default_factory=dict, repr=False)  # parameter name -> its shape
    _plans: dict = field(default_factory=dict, repr=False)  # bucket index -> PackPlan
    _pending: list = field(default_factory=list, repr=False)
    _nonfinite: torch.Tensor | None = field(default=None, repr=False)
    _step_open: bool = field(default=False, repr=False)

    # --- set-up -------------------------------------------------------------------------------
    def bind(self, module: torch.nn.Module) -> None:
        """Check the mask fits ``module`` and capture what the plans need of it (each parameter's
        name by its tensor's identity, each name's shape); the module itself is not kept."""
        self.mask.validate(module)
        named = list(module.named_parameters())
        self._names = {id(p): n for n, p in named}
        self._shapes = {n: tuple(p.shape) for n, p in named}
        self._plans.clear()

    def set_mask(self, mask: Mask) -> None:
        """Swap the shared mask (mask refresh) between steps.

        Collective: every rank must call it; raises, listing each rank's digest, unless all
        ranks hold ``mask``, or naming the first parameter the mask does not fit. Packing
        plans are rebuilt on the next step.
        """
        self._check_fits(mask)
        mask.assert_same_on_all_ranks(self.process_group)
        self.mask = mask
        self._plans.clear()

    def _check_fits(self, mask: Mask) -> None:
        fix = "the mask was made for another model: recompute it for this model or load the matching file"
        for name, shape in self._shapes.items():
            if name not in mask:
                raise MaskMismatch(f"mask has no entry for parameter {name!r} of the model; {fix}")
            if tuple(mask[name].shape) != shape:
                raise MaskMismatch(f"parameter {name!r} has shape {shape} in the model but "
                                   f"{tuple(mask[name].shape)} in the mask; {fix}")
        extra = sorted(set(mask) - set(self._shapes))
        if extra:
            raise MaskMismatch(f"mask entry {extra[0]!r} is not a parameter of the model; {fix}")

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.process_group)

    @property
    def num_plans(self) -> int:
        """``stats().plans``: tells whether a model really spans several buckets."""
        return len(self._plans)

    def plan_for(self, bucket: dist.GradBucket) -> PackPlan:
        """The bucket's packing plan, rebuilt whenever its parameters (identity, order) changed."""
        params = bucket.parameters()
        plan = self._plans.get(bucket.index())
        if plan is None or not plan.matches(params):
            positions = {p: self.mask.flat_indices(self._names[id(p)]) for p in params}
            plan = build_plan(params, positions, bucket.buffer().device)
            self._plans[bucket.index()] = plan
        return plan

    # --- per-step bookkeeping -----------------------------------------------------------------
    def _begin_bucket(self, buffer: torch.Tensor) -> None:
        if not self._step_open:
            self._step_open = True
            self._nonfinite = torch.zeros((), dtype=torch.bool, device=buffer.device)
        self.dense_bytes += buffer.numel() * buffer.element_size()

    def _record_sent(self, tensor: torch.Tensor) -> None:
        self.bytes_sent += tensor.numel() * tensor.element_size()

    def _check_finite(self, reduced: torch.Tensor) -> None:
        # A device-side flag: no host sync on the hot path. Reduced values are identical on
        # every rank, so every rank reaches the same verdict.
        if reduced.numel():
            self._nonfinite.logical_or_(~torch.isfinite(reduced).all())

    def _end_step(self) -> None:
        self.steps += 1
        self._step_open = False

    def found_nonfinite(self) -> bool:
        """True if the last synchronised step's reduced gradient held NaN or Inf (same on all ranks)."""
        return bool(self._nonfinite) if self._nonfinite is not None else False

    # --- reporting and checkpoints ------------------------------------------------------------
    def stats(self) -> HookStats:
        """Bytes sent against dense DDP's, steps, and the plans' memory (see :class:`HookStats`)."""
        plans = list(self._plans.values())
        return HookStats(
            compress_rate=self.dense_bytes / self.bytes_sent if self.bytes_sent else 0.0,
            dense_bytes=self.dense_bytes, bytes_sent=self.bytes_sent, steps=self.steps, plans=len(plans),
            plan_bytes=sum(p.index.numel() * p.index.element_size() for p in plans))

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps, "bytes_sent": self.bytes_sent, "dense_bytes": self.dense_bytes,
            "dense": self.dense, "mask_digest": self.mask.digest(),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore the counters; a ``mask_digest`` in ``sd`` (as :meth:`state_dict` writes) must
        be this hook's mask's (a caller that stores the mask and its digest itself may drop it)."""
        if "mask_digest" in sd and sd["mask_digest"] != self.mask.digest():
            raise ValueError(
                f"hook state was saved with mask {sd['mask_digest'][:12]} but the hook holds mask "
                f"{self.mask.digest()[:12]}; load the mask saved with the checkpoint first"
            )
        self.steps, self.bytes_sent, self.dense_bytes = sd["steps"], sd["bytes_sent"], sd["dense_bytes"]
        self.dense = sd["dense"]


def _to_wire(values: torch.Tensor, state: MaskedAllReduceState) -> torch.Tensor:
    """Average-then-cast: divide by world size before a narrowing cast, to avoid fp16 overflow."""
    values = values.div_(state.world_size)
    return values.to(state.wire_dtype) if state.wire_dtype is not None else values


def _allreduce(tensor: torch.Tensor, state: MaskedAllReduceState) -> torch.futures.Future:
    state._record_sent(tensor)
    work = dist.all_reduce(tensor, group=state.process_group, async_op=True)
    return work.get_future()


def _completed(buffer: torch.Tensor) -> torch.futures.Future:
    fut = torch.futures.Future(devices=[buffer.device] if buffer.is_cuda else None)
    fut.set_result(buffer)
    return fut


def _dense_bucket(state: MaskedAllReduceState, bucket: dist.GradBucket) -> torch.futures.Future:
    """Full averaged all-reduce of the bucket. Sends ``numel x wire_bytes``."""
    buffer = bucket.buffer()
    wire = _to_wire(buffer, state)  # in place: the buffer is overwritten by the result anyway

    def done(fut: torch.futures.Future) -> torch.Tensor:
        reduced = fut.value()[0]
        state._check_finite(reduced)
        if reduced is not buffer:
            buffer.copy_(reduced)
        return buffer

    return _allreduce(wire, state).then(done)


def _masked_bucket(state: MaskedAllReduceState, bucket: dist.GradBucket) -> torch.futures.Future:
    """One all-reduce of this bucket's k masked values. Sends ``k x wire_bytes``; nothing if k = 0."""
    buffer = bucket.buffer()
    plan = state.plan_for(bucket)
    if plan.k == 0:
        buffer.zero_()
        return _completed(buffer)
    sent = _allreduce(_to_wire(pack(buffer, plan), state), state)
    # Unmasked entries leave the hook as zeros. Zeroing (O(n)) runs while the all-reduce of the
    # packed copy is on the wire; the callback is attached after it, so unpack_ always runs later.
    buffer.zero_()

    def done(fut: torch.futures.Future) -> torch.Tensor:
        reduced = fut.value()[0]
        state._check_finite(reduced)
        return unpack_(buffer, plan, reduced)

    return sent.then(done)


def _fused_bucket(state: MaskedAllReduceState, bucket: dist.GradBucket) -> torch.futures.Future:
    """Queue this bucket's packed values; the last bucket sends all of them in ONE all-reduce.

    Sends ``sum(k_b) x wire_bytes`` once per step (nothing if the mask selects no entry).
    """
    buffer = bucket.buffer()
    plan = state.plan_for(bucket)
    packed = pack(buffer, plan)
    fut = torch.futures.Future(devices=[buffer.device] if buffer.is_cuda else None)
    state._pending.append(_PendingBucket(buffer, plan, packed, fut))
    if not bucket.is_last():
        return fut  # its buffer is zeroed below, while the step's all-reduce is on the wire

    pending, state._pending = state._pending, []
    flat = torch.cat([p.packed for p in pending])
    if flat.numel() == 0:
        for p in pending:
            p.buffer.zero_()
        for p in pending[:-1]:
            p.future.set_result(p.buffer)
        return _completed(buffer)
    sent = _allreduce(_to_wire(flat, state), state)
    # Unmasked entries leave the hook as zeros. The O(n) zeroing of every bucket runs while the
    # packed copy is on the wire; `done` is attached after it, so unpack_ always runs later.
    for p in pending:
        p.buffer.zero_()

    def done(all_fut: torch.futures.Future) -> torch.Tensor:
        reduced = all_fut.value()[0]
        state._check_finite(reduced)
        offset = 0
        for p in pending:
            unpack_(p.buffer, p.plan, reduced[offset:offset + p.plan.k])
            offset += p.plan.k
        for p in pending[:-1]:
            p.future.set_result(p.buffer)
        return buffer

    return sent.then(done)


def masked_allreduce_hook(state: MaskedAllReduceState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: average only the masked gradient entries across ranks.

    Returns the bucket with masked entries set to the cross-rank mean and all other entries zero.
    What crosses the network per step and rank: ``k`` values of ``wire_dtype`` (``k`` = entries
    the mask selects), in one all-reduce (``fused``) or one per bucket holding masked entries;
    with ``state.dense`` set, every entry of every bucket. No index ever travels.
    """
    state._begin_bucket(bucket.buffer())
    try:
        if state.dense:
            return _dense_bucket(state, bucket)
        if state.fused:
            return _fused_bucket(state, bucket)
        return _masked_bucket(state, bucket)
    finally:
        if bucket.is_last():
            state._end_step()


def register_masked_allreduce(ddp_model: DistributedDataParallel, mask: Mask, *, wire_dtype=None,
                              process_group=None, fused: bool = True) -> MaskedAllReduceState:
    """Register :func:`masked_allreduce_hook` on ``ddp_model`` and return its state.

    Checks that ``mask`` fits the wrapped module and that every rank holds the same mask (a
    collective: all ranks must call this). Call before the first backward.
    """
    if not isinstance(ddp_model, DistributedDataParallel):
        raise TypeError(
            f"register_masked_allreduce needs a torch.nn.parallel.DistributedDataParallel module, "
            f"got {type(ddp_model).__name__}; wrap the model first: DistributedDataParallel(model)"
        )
    state = MaskedAllReduceState(mask=mask, process_group=process_group,
                                 wire_dtype=resolve_wire_dtype(wire_dtype), fused=bool(fused))
    state.bind(ddp_model.module)
    mask.assert_same_on_all_ranks(process_group)
    ddp_model.register_comm_hook(state, masked_allreduce_hook)
    let_comm_threads_finish_at_exit()
    return state
