"""The core contract, checked the same way for every stack integration (tests/test_integration_*.py).

Inside each rank, around the stack's own training:

* :class:`WireTap` wraps ``torch.distributed.all_reduce`` and records the payload of every call made
  during a backward pass (the comm hook runs there): bytes and calls counted apart from the
  hook's own ``bytes_sent``;
* :func:`snapshot` before, :func:`facts` after: how many entries outside the mask changed (must
  be 0, bit for bit), how many inside did, the optimizer's state size (non-scalar tensors' numel),
  this rank's mask digest and every rank's (gathered), and a digest of the trained parameters.

:func:`assert_contract` then checks the ranks' facts in the parent.
"""
from __future__ import annotations

import hashlib

import pytest
import torch
import torch.distributed as dist


class WireTap:
    """Records ``torch.distributed.all_reduce`` payloads issued inside a backward pass."""

    def __init__(self):
        self.bytes = 0
        self.calls = 0
        self.dtypes: set[torch.dtype] = set()
        self._real = None

    def __enter__(self) -> "WireTap":
        self._real = real = dist.all_reduce

        def all_reduce(tensor, *args, **kwargs):
            if torch._C._current_graph_task_id() != -1:  # called from autograd: a DDP comm hook
                self.bytes += tensor.numel() * tensor.element_size()
                self.calls += 1
                self.dtypes.add(tensor.dtype)
            return real(tensor, *args, **kwargs)

        dist.all_reduce = all_reduce
        return self

    def __exit__(self, *exc) -> None:
        dist.all_reduce = self._real


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def state_numel(optimizer) -> int:
    """Entries held in the optimizer's state tensors (moments, momentum); scalars (``step``) aside."""
    while hasattr(optimizer, "optimizer"):  # AcceleratedOptimizer, LightningOptimizer
        optimizer = optimizer.optimizer
    return sum(v.numel() for st in optimizer.state.values() for v in st.values()
               if isinstance(v, torch.Tensor) and v.dim() > 0)


def facts(module: torch.nn.Module, before: dict, mask, comm_state, optimizer, tap: WireTap) -> dict:
    """What the parent checks, from one rank (module: the unwrapped model the mask names)."""
    after = dict(module.named_parameters())
    outside = inside = 0
    h = hashlib.sha256()
    for name, old in before.items():
        new = after[name].detach()
        changed = new.view(-1).view(torch.int32) != old.view(-1).view(torch.int32)  # bit for bit
        selected = mask[name].reshape(-1)
        outside += int((changed & ~selected).sum())
        inside += int((changed & selected).sum())
        h.update(new.contiguous().numpy().tobytes())
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, mask.digest())
    return {"k": mask.num_selected, "n": mask.numel, "digest": mask.digest(), "all_digests": digests,
            "changed_outside": outside, "changed_inside": inside, "state_numel": state_numel(optimizer),
            "tap_bytes": tap.bytes, "tap_calls": tap.calls, "tap_dtypes": sorted(map(str, tap.dtypes)),
            "hook_bytes": comm_state.bytes_sent, "hook_steps": comm_state.steps,
            "dense_bytes": comm_state.dense_bytes, "params": h.hexdigest()}


def assert_contract(results: list[dict], steps: int, state_per_entry: int = 2) -> dict:
    """Each rank sent exactly k fp32 values per synchronised step in one all-reduce, left every
    unselected entry bit-identical, holds O(k) optimizer state and the same mask and parameters."""
    r0 = results[0]
    k = r0["k"]
    assert 0 < k < r0["n"]
    for r in results:
        assert r["all_digests"] == [r0["digest"]] * len(results)
        assert r["digest"] == r0["digest"]
        assert r["hook_steps"] == steps
        assert r["tap_calls"] == steps  # one fused all-reduce per synchronised step
        assert r["tap_dtypes"] == ["torch.float32"]
        assert r["tap_bytes"] == steps * k * 4 == r["hook_bytes"]
        assert r["changed_outside"] == 0
        assert r["changed_inside"] > 0
        assert r["state_numel"] == state_per_entry * k
        assert r["params"] == r0["params"]  # the ranks trained in step
    return {"k": k, "bytes_per_step": r0["tap_bytes"] // steps, "dense_bytes_per_step": r0["dense_bytes"] // steps}


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps its process state in a class-wide singleton (transformers' Trainer uses it
    too): a test that builds one in the pytest process must not leave it to the ranks the next
    test forks. Import this fixture into a test module to apply it there."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
