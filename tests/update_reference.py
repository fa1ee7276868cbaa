"""The update a masked step must make, computed without DDP, hooks or the stacks
(tests/test_integration_*.py compare each integration's parameters with it).

:func:`masked_sgd_reference` replays a run in one process with plain autograd: for every
optimizer step it takes each rank's micro-batches, computes the gradient of each, averages them
over micro-batches and ranks (what dense DDP gives for a loss divided by the accumulation steps),
multiplies by ``scale`` (a factor the stack puts into its loss, e.g. Hugging Face's) and moves the
mask's entries by ``-lr x gradient`` (SGD without momentum or weight decay); every other entry
stays where it was. It also returns each step's loss on each rank (the mean over its micro-batches,
at the parameters the step started from).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


def masked_sgd_reference(model: nn.Module, steps: Sequence[Sequence[Sequence[object]]],
                         loss_of: Callable[[nn.Module, object], torch.Tensor], mask: dict[str, torch.Tensor],
                         lr: float, scale: float = 1.0) -> tuple[dict[str, torch.Tensor], list[list[float]]]:
    """``(parameters, losses)``: the parameters of ``model`` (trained in place) after
    ``steps[s][rank]`` = that rank's micro-batches of optimizer step ``s``, and each step's mean
    loss on each rank, ``losses[s][rank]``; ``mask[name]``: the bool tensor of trained entries."""
    params = dict(model.named_parameters())
    losses = []
    for per_rank in steps:
        total = {name: torch.zeros_like(p) for name, p in params.items()}
        count, rank_losses = 0, []
        for micro_batches in per_rank:
            rank_losses.append(0.0)
            for batch in micro_batches:
                model.zero_grad(set_to_none=True)
                loss = loss_of(model, batch)
                loss.backward()
                rank_losses[-1] += float(loss.detach()) / len(micro_batches)
                for name, p in params.items():
                    if p.grad is not None:
                        total[name] += p.grad
                count += 1
        with torch.no_grad():
            for name, p in params.items():
                p -= lr * scale * (total[name] / count) * mask[name]
        losses.append(rank_losses)
    return {name: p.detach().clone() for name, p in params.items()}, losses


def assert_params_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], before: dict[str, torch.Tensor],
                        rtol: float = 1e-4, atol: float = 1e-6) -> None:
    """``got`` equals ``want`` within float tolerance, and both moved (the comparison is not vacuous)."""
    assert got.keys() == want.keys()
    moved = 0.0
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
        moved = max(moved, float((want[name] - before[name]).abs().max()))
    assert moved > 100 * atol, f"the reference barely moved ({moved}): the comparison would prove nothing"
