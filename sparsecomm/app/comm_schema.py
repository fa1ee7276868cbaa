"""The ``comm/`` group's schema: one dataclass per option, each checking its own fields.

Registered with the rest of the schema by :mod:`sparsecomm.app.schema` (``schema/comm/<option>``);
``conf/comm/<option>.yaml`` extends it. :meth:`CommConfig.check` raises a ValueError naming the
field (``comm.<field>=...``) and the fix; ``cfg`` (the whole config) is not needed by any of them.
``uses_mask`` tells the config's checks whether the mask kind's sparse steps happen at all.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from omegaconf import MISSING

from sparsecomm.hook import resolve_wire_dtype

from .fields import Option


def _comm_error(field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"comm.{field}={value!r}: {why}")


@dataclass
class CommConfig(Option):
    """Every option: DDP (gradients as views of its buckets) and what it broadcasts."""

    uses_mask: ClassVar[bool] = False  # sends what a mask selects (masked alone); else every entry trains
    name: str = MISSING
    bucket_cap_mb: int = 25  # DDP's bucket size, MiB
    sync_buffers: bool = True  # DDP broadcasts rank 0's buffers (BatchNorm statistics) every step; counted apart

    def check(self, cfg: Any = None) -> None:
        """Raise ValueError naming the first field out of its range (``comm.<field>=...``)."""
        if not self.bucket_cap_mb > 0:
            raise _comm_error("bucket_cap_mb", self.bucket_cap_mb, "must be > 0 (MiB per DDP bucket), e.g. 25")


@dataclass
class DenseComm(CommConfig):
    """DDP's own all-reduce of every gradient entry."""


@dataclass
class CastComm(CommConfig):
    """torch's fp16 / bf16 compression hook: every entry, in 2 bytes."""


@dataclass
class PowerSGDComm(CommConfig):
    """torch's PowerSGD hook: rank-r factors P, Q of each matrix-shaped gradient."""

    bucket_cap_mb: int = 65536  # one bucket: torch's PowerSGD hook fails on Gloo with several
    rank: int = 1  # matrix approximation rank (1-4 typical)
    error_feedback: bool = True  # add what compression dropped to the next step's gradient
    warm_start: bool = True  # start each step's power iteration from the last one's factors
    start_iter: int = 2  # plain all-reduce for the first N steps (>= 2 with error feedback or warm start)
    min_compression_rate: float = 2.0  # a tensor is compressed only if (n + m) r x this < n m
    orthogonalization_epsilon: float = 1.0e-8  # 0 gave NaN on 4 ranks

    def check(self, cfg: Any = None) -> None:
        super().check(cfg)
        if self.rank < 1:
            raise _comm_error("rank", self.rank, "must be >= 1 (the factors' rank), e.g. comm.rank=4")
        if (self.error_feedback or self.warm_start) and self.start_iter < 2:
            raise _comm_error("start_iter", self.start_iter, "must be >= 2 with error feedback or warm start "
                              "(DDP rebuilds its buckets after step 1); use comm.start_iter=2")
        if self.min_compression_rate < 1 or self.orthogonalization_epsilon < 0:
            raise _comm_error("min_compression_rate", self.min_compression_rate,
                              "must be >= 1 (and comm.orthogonalization_epsilon >= 0)")


@dataclass
class PostLocalComm(CommConfig):
    """torch's post-local SGD: plain all-reduce for start_iter steps, then local steps and the
    parameters averaged every period steps (PeriodicModelAverager)."""

    period: int = 4  # steps between parameter averagings
    start_iter: int = 1  # steps with an all-reduced gradient before the local ones

    def check(self, cfg: Any = None) -> None:
        super().check(cfg)
        if self.period < 1:
            raise _comm_error("period", self.period, "must be >= 1 (steps between averagings), e.g. comm.period=8")
        if self.start_iter < 0:
            raise _comm_error("start_iter", self.start_iter, "must be >= 0 (all-reduced steps first)")


@dataclass
class MaskedComm(CommConfig):
    """The masked all-reduce hook (sparsecomm/hook.py): the k entries the mask selects."""

    uses_mask = True

    wire_dtype: Optional[str] = None  # null: the gradient's dtype; fp16 | bf16 halve the bytes
    fused: bool = True  # one all-reduce per step for all buckets

    def check(self, cfg: Any = None) -> None:
        super().check(cfg)
        try:
            resolve_wire_dtype(self.wire_dtype)
        except ValueError as e:  # "wire_dtype=... is not supported; use ..."
            raise ValueError(f"comm.{e}") from None
