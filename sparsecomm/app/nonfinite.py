"""Steps whose all-reduced gradient holds NaN/Inf are skipped; too many in a row stop the run
(config group ``nonfinite``).

The verdict comes from the reduced gradient, which every rank holds alike, so every rank skips the
same steps without exchanging anything: nothing of this module crosses the network.
"""
from __future__ import annotations

from collections.abc import Mapping


class NonFiniteGradients(ValueError):
    """Too many steps in a row whose all-reduced gradient held NaN/Inf; the message says what to change."""

    collective = True  # every rank sees the same all-reduced gradient


class NonFiniteGuard:
    """Skip steps whose all-reduced gradient held NaN/Inf (the same verdict on every rank).

    ``skipped``: steps skipped so far; ``in_a_row``: the current streak. The run stops with
    :class:`NonFiniteGradients` when the streak reaches ``max_in_a_row``. A checkpoint component
    (``state_dict``/``load_state_dict``: the two counters).
    """

    def __init__(self, max_in_a_row: int = 5):
        self.max_in_a_row = int(max_in_a_row)
        self.skipped = 0
        self.in_a_row = 0
        self.last_skipped = False

    def check(self, bad: bool, step: int) -> bool:
        """Record step ``step``'s verdict; True if the step must be skipped."""
        self.last_skipped = bool(bad)
        if not bad:
            self.in_a_row = 0
            return False
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteGradients(
                f"step {step}: the all-reduced gradient held NaN/Inf for {self.in_a_row} steps in a row "
                f"(nonfinite.max_in_a_row={self.max_in_a_row}, {self.skipped} skipped in all); lower optim.lr / "
                f"optim.dense_lr, check the data, or raise nonfinite.max_in_a_row")
        return True

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.skipped, self.in_a_row = int(state["skipped"]), int(state["in_a_row"])
