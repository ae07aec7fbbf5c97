"""Capped exponential backoff, the one way this package waits before trying again
(database reconnects, SSH reconnects, sbatch after failures, transfers, queue lookups)."""
from __future__ import annotations


class Backoff:
    """``first`` seconds after the first failure in a row, doubling after each further
    one, never more than ``cap``; ``reset()`` after a success."""

    def __init__(self, first: float, cap: float):
        self.first = first
        self.cap = cap
        self.failures = 0

    def failed(self) -> float:
        """Count a failure; the seconds to wait before the next try."""
        self.failures += 1
        return self.delay(self.failures)

    def delay(self, failures: int) -> float:
        """The wait after ``failures`` failures in a row (1 or more)."""
        return min(self.cap, self.first * 2.0 ** min(max(failures - 1, 0), 30))

    def reset(self) -> None:
        self.failures = 0
