"""Sliding windows of the circuit breaker (resilience4j's count- and time-based windows).

Outcomes are small ints: bit 1 failed, bit 2 slow, 0 a plain success. Both windows keep running
totals, so recording is O(1) (amortised for the time window) and reading the rates is free.
"""

from __future__ import annotations

import math

__all__ = ["CountWindow", "TimeWindow"]


class CountWindow:
    """The last ``size`` outcomes in a ring (bit 1 failed, bit 2 slow; -1 empty) with running totals.

    ``record`` returns whether the breaker must check its thresholds: True when a failed or slow
    call was added, or when the window has just reached ``minimum`` calls; otherwise the rates
    cannot have risen since the last check."""

    def __init__(self, size: int, minimum: int) -> None:
        self._size, self.minimum = size, min(minimum, size)  # as in resilience4j
        self.clear()

    def clear(self) -> None:
        self._ring = [-1] * self._size
        self._i = 0
        self.calls = self.failed = self.slow = 0

    def record(self, now: float, outcome: int) -> bool:
        i, ring = self._i, self._ring
        old = ring[i]
        ring[i] = outcome
        self._i = i + 1 if i + 1 < self._size else 0
        if old == outcome:
            return False
        if old < 0:
            self.calls += 1
            old = 0
        self.failed += (outcome & 1) - (old & 1)
        self.slow += (outcome >> 1) - (old >> 1)
        return outcome != 0 or self.calls == self.minimum

    def totals(self, now: float) -> tuple[int, int, int]:
        return self.calls, self.failed, self.slow


class TimeWindow:
    """The last ``size`` seconds in per-second buckets ``[calls, failed, slow]`` with running totals;
    a bucket is emptied at most once per second that passes, so a record is O(1) amortised.
    ``record`` returns True as the count window's does, and also when buckets expired."""

    def __init__(self, size: int, minimum: int) -> None:
        self._size, self.minimum = size, minimum
        self.clear()

    def clear(self) -> None:
        self._buckets = [[0, 0, 0] for _ in range(self._size)]
        self._head = -(2**62)  # second of the newest bucket; far past means every bucket is stale
        self._next = -math.inf  # start of the second after the head: the only time a record expires buckets
        self._current = self._buckets[0]
        self.calls = self.failed = self.slow = 0

    def _expiring(self, sec: int) -> list[list[int]]:
        """Buckets that fall out of the window when the newest second moves from the head to ``sec``."""
        first = max(self._head + 1, sec - self._size + 1) if self.calls else sec + 1
        return [self._buckets[t % self._size] for t in range(first, sec + 1)]

    def record(self, now: float, outcome: int) -> bool:
        expired = now >= self._next
        if expired:
            sec = math.floor(now)
            for bucket in self._expiring(sec):
                self.calls -= bucket[0]
                self.failed -= bucket[1]
                self.slow -= bucket[2]
                bucket[:] = (0, 0, 0)
            self._head, self._next, self._current = sec, sec + 1, self._buckets[sec % self._size]
        current = self._current
        current[0] += 1
        self.calls += 1
        if outcome:
            failed, slow = outcome & 1, outcome >> 1
            current[1] += failed
            current[2] += slow
            self.failed += failed
            self.slow += slow
            return True
        return expired or self.calls == self.minimum

    def totals(self, now: float) -> tuple[int, int, int]:
        """Totals as of ``now``, changing nothing (a scrape may call it)."""
        calls, failed, slow = self.calls, self.failed, self.slow
        for c, f, s in self._expiring(math.floor(now)):
            calls, failed, slow = calls - c, failed - f, slow - s
        return calls, failed, slow
