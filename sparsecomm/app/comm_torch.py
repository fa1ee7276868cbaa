"""The ``comm/`` options built on torch's own hooks: dense, fp16, bf16, powersgd, post_local.

Each one wraps the model in DDP (:func:`~sparsecomm.app.comm_base.wrap_ddp`), registers torch's
hook through a thin counting hook, and says in its docstring what crosses the wire per step
(``n`` = trainable gradient entries, 4 bytes each in fp32). Every option trains every entry
with ``optim/``'s dense optimizer. The counts are the payload each all-reduce is handed, per
rank, exactly as :mod:`sparsecomm.hook` counts its own.
"""
# No `from __future__ import annotations`: DDP checks a hook's `bucket` annotation at runtime.

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import PostLocalSGDState, post_localSGD_hook
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState, powerSGD_hook
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
from torch.distributed.algorithms.model_averaging.utils import get_params_to_average

from .comm_base import GradientSync, Tally
from .units import tensor_bytes

MIB = 1 << 20


# --- dense ------------------------------------------------------------------------------------------
class DenseSync(GradientSync):
    """``comm=dense``: DDP's own all-reduce, no hook.

    Per step and rank: every trainable gradient entry in its dtype, ``n x 4`` bytes in fp32, in
    one all-reduce per DDP bucket (DDP's C++ reducer: counted here, as the sum of its buckets).
    """

    name = "dense"

    def _register(self) -> Tally:
        return Tally()

    def _count_step(self) -> None:
        super()._count_step()
        self.tally.bytes_sent += self.grad_bytes


# --- fp16 / bf16 ------------------------------------------------------------------------------------
@dataclass
class CastState(Tally):
    """State of :func:`cast_hook`: torch's compression hook, its process group, the wire width."""

    compress: Callable | None = None  # default_hooks.fp16_compress_hook or bf16_compress_hook
    process_group: Any = None
    wire_bytes: int = 2


def cast_hook(state: CastState, bucket):
    """torch's fp16/bf16 compression hook, counted: the bucket divided by the world size and cast,
    ``numel x 2`` bytes in one all-reduce per bucket, cast back in place."""
    state.bytes_sent += bucket.buffer().numel() * state.wire_bytes
    return state.compress(state.process_group, bucket)


class CastSync(GradientSync):
    """``comm=fp16`` / ``comm=bf16``: torch's ``fp16_compress_hook`` / ``bf16_compress_hook``.

    Per step and rank: every gradient entry as a 2-byte float, ``n x 2`` bytes, one all-reduce
    per bucket. (DDP refuses torch's bf16 hook by name unless CUDA and NCCL >= 2.10; registered
    through :func:`cast_hook` it runs on Gloo too.)
    """

    HOOKS = {"fp16": default_hooks.fp16_compress_hook, "bf16": default_hooks.bf16_compress_hook}

    def __init__(self, cfg: Mapping, *args, **kwargs):
        self.name = self.wire_dtype = str(cfg.name)
        super().__init__(cfg, *args, **kwargs)

    def _register(self) -> Tally:
        state = CastState(compress=self.HOOKS[self.name])
        self.ddp.register_comm_hook(state, cast_hook)
        return state


# --- powersgd -----------------------------------------------------------------------------------------
@dataclass
class PowerSGDTally(Tally):
    """State of :func:`counted_powersgd_hook`: torch's ``PowerSGDState`` and the counters."""

    psgd: PowerSGDState | None = None
    plain_left: int = 0  # plain all-reduce steps still due (a resumed run: DDP rebuilds its buckets first)


def counted_powersgd_hook(state: PowerSGDTally, bucket):
    """torch's ``powerSGD_hook``, counted. Before ``start_iter`` (and for two steps after a
    resume): the whole bucket, ``numel x 4`` bytes. Then, per bucket, three all-reduces: the
    vectors and other tensors not worth compressing whole (``n_i x m_i`` entries each), every
    matrix's P (``n_i x r``), every matrix's Q (``m_i x r``); torch's own tally of entries after
    compression says exactly how many."""
    psgd, buffer = state.psgd, bucket.buffer()
    if state.plain_left > 0:
        state.plain_left -= int(bucket.is_last())
        state.bytes_sent += buffer.numel() * buffer.element_size()
        return default_hooks.allreduce_hook(psgd.process_group, bucket)
    if psgd.iter < psgd.start_powerSGD_iter:
        state.bytes_sent += buffer.numel() * buffer.element_size()
        return powerSGD_hook(psgd, bucket)
    before = psgd.total_numel_after_compression
    fut = powerSGD_hook(psgd, bucket)
    state.bytes_sent += (psgd.total_numel_after_compression - before) * buffer.element_size()
    return fut


class PowerSGDSync(GradientSync):
    """``comm=powersgd``: torch's PowerSGD (``rank``, ``error_feedback``, ``warm_start``, ``start_iter``).

    Per step and rank, once compressing: ``sum_i (n_i + m_i) r`` entries for the matrix-shaped
    gradients (a conv weight is ``out x in*kh*kw``) plus every vector whole, x 4 bytes; before
    ``start_iter``, ``n x 4``. Memory between steps: the error feedback (n entries) and the
    warm-start factors. On Gloo the model must fit one DDP bucket (torch's hook fails with
    several): the option's ``bucket_cap_mb`` is 65536 MiB.
    """

    name = "powersgd"

    def _register(self) -> Tally:
        cfg = self.cfg
        if dist.get_backend() == "gloo" and self.grad_bytes > cfg.bucket_cap_mb * MIB:
            raise ValueError(
                f"comm.bucket_cap_mb={cfg.bucket_cap_mb} splits this model's {self.grad_bytes / MIB:.1f} MiB of "
                f"gradients into several DDP buckets, and torch's PowerSGD hook fails on Gloo with more than one; "
                f"raise comm.bucket_cap_mb (the option's default, 65536, keeps one)")
        psgd = PowerSGDState(
            process_group=None, matrix_approximation_rank=int(cfg.rank), start_powerSGD_iter=int(cfg.start_iter),
            min_compression_rate=float(cfg.min_compression_rate), use_error_feedback=bool(cfg.error_feedback),
            warm_start=bool(cfg.warm_start), orthogonalization_epsilon=float(cfg.orthogonalization_epsilon))
        state = PowerSGDTally(psgd=psgd)
        self.ddp.register_comm_hook(state, counted_powersgd_hook)
        return state

    def _memories(self) -> dict[str, dict[int, torch.Tensor]]:
        psgd = self.tally.psgd
        return {"error": psgd.error_dict, "p": psgd.p_memory_dict, "q": psgd.q_memory_dict}

    def option_stats(self) -> dict[str, Any]:
        rate, before, after = self.tally.psgd.compression_stats()
        return {"rank": int(self.cfg.rank), "compress_rate": rate, "numel_before": before, "numel_after": after,
                "state_bytes": tensor_bytes(self._memories())}

    def option_state(self) -> dict[str, Any]:
        """torch's iteration, tallies, RNG (as tensors) and memories (error feedback, P, Q; on CPU)."""
        psgd = self.tally.psgd
        _, keys, pos, has_gauss, gauss = psgd.rng.get_state()
        return {"iter": psgd.iter, "before": psgd.total_numel_before_compression,
                "after": psgd.total_numel_after_compression,
                "rng": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                        "has_gauss": int(has_gauss), "gauss": float(gauss)},
                "memories": {k: {i: t.detach().cpu() for i, t in d.items()} for k, d in self._memories().items()}}

    def load_option_state(self, sd: Mapping[str, Any]) -> None:
        """Restore :meth:`option_state`; the new DDP rebuilds its buckets after its first step, so the
        first two steps of a resumed run are plain all-reduces (torch's own ``start_iter >= 2`` reason)."""
        psgd = self.tally.psgd
        psgd.iter, psgd.total_numel_before_compression = int(sd["iter"]), int(sd["before"])
        psgd.total_numel_after_compression = int(sd["after"])
        rng = sd["rng"]
        psgd.rng.set_state(("MT19937", rng["keys"].numpy().astype(np.uint32), rng["pos"], rng["has_gauss"],
                            rng["gauss"]))
        device = next(self.ddp.module.parameters()).device
        for name, memory in self._memories().items():
            memory.clear()
            memory.update({int(i): t.to(device) for i, t in sd["memories"][name].items()})
        if psgd.iter >= psgd.start_powerSGD_iter:
            self.tally.plain_left = 2


# --- post_local -----------------------------------------------------------------------------------------
@dataclass
class PostLocalTally(Tally):
    """State of :func:`counted_post_local_hook`: torch's ``PostLocalSGDState`` and the counters."""

    local: PostLocalSGDState | None = None
    reduced: bool = True  # the last backward's gradient was all-reduced (before start_iter)


def counted_post_local_hook(state: PostLocalTally, bucket):
    """torch's ``post_localSGD_hook``, counted: before ``start_iter`` the bucket averaged across
    ranks (``numel x 4`` bytes); from then on nothing: each rank keeps its own gradient."""
    local, buffer = state.local, bucket.buffer()
    state.reduced = local.iter < local.start_localSGD_iter
    if state.reduced:
        state.bytes_sent += buffer.numel() * buffer.element_size()
    return post_localSGD_hook(local, bucket)


class PostLocalSync(GradientSync):
    """``comm=post_local``: torch's post-local SGD (``start_iter``, ``period``).

    Per step and rank: ``n x 4`` bytes (the gradient) for the first ``start_iter`` steps; then
    the parameters that have a gradient, ``n x 4`` bytes in one all-reduce, after the update of
    every ``period``-th step (torch's ``PeriodicModelAverager``), and on the steps between a
    4-byte flag so that every rank agrees whether some rank's gradient holds NaN/Inf. Between
    averagings the ranks' parameters differ.
    """

    name = "post_local"

    def _register(self) -> Tally:
        cfg = self.cfg
        state = PostLocalTally(local=PostLocalSGDState(process_group=None, subgroup=None,
                                                       start_localSGD_iter=int(cfg.start_iter),
                                                       post_local_gradient_allreduce=False))
        self.averager = PeriodicModelAverager(period=int(cfg.period), warmup_steps=int(cfg.start_iter))
        self.averagings = 0
        self.ddp.register_comm_hook(state, counted_post_local_hook)
        return state

    def after_update(self) -> None:
        """Average the parameters when the averager is due (collective on every rank alike).

        torch's averager leaves each parameter a view of one flat buffer; they get their own
        storage back (the values copied in), so a parameter never shares memory with another."""
        av = self.averager
        if not (av.step >= av.warmup_steps and (av.step - av.warmup_steps) % av.period == 0):
            av.average_parameters([])  # not due: the averager counts the step
            return
        params = get_params_to_average(self.ddp.module.parameters())
        own = [p.data for p in params]
        self.tally.bytes_sent += sum(p.numel() * p.element_size() for p in params)
        av.average_parameters(params)
        with torch.no_grad():
            for p, storage in zip(params, own):
                storage.copy_(p.data)
                p.data = storage
        self.averagings += 1

    def found_nonfinite(self, model: torch.nn.Module) -> bool:
        """All-reduced steps: the local check. Local steps: each rank checks its own gradient and
        one all-reduce (MAX) of a 4-byte flag gives every rank the same verdict."""
        local = super().found_nonfinite(model)
        if self.tally.reduced:
            return local
        flag = torch.tensor([int(local)], dtype=torch.int32, device=next(model.parameters()).device)
        self.tally.bytes_sent += flag.numel() * flag.element_size()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def option_stats(self) -> dict[str, Any]:
        return {"period": int(self.cfg.period), "averagings": self.averagings, "state_bytes": 0}

    def option_state(self) -> dict[str, Any]:
        return {"iter": self.tally.local.iter, "averager_step": self.averager.step, "averagings": self.averagings}

    def load_option_state(self, sd: Mapping[str, Any]) -> None:
        self.tally.local.iter, self.averager.step = int(sd["iter"]), int(sd["averager_step"])
        self.averagings = int(sd["averagings"])
