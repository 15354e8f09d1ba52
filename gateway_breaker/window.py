"""Rolling counts of calls and failures over the last `window_seconds`."""

from __future__ import annotations

BUCKETS = 10


class RollingWindow:
    """Calls and failures in the last `seconds`, kept in a fixed ring of buckets.

    Memory is constant (BUCKETS slots) and each record is O(1) amortised: buckets that slid out
    of the window are cleared as time moves on. Resolution is `seconds / BUCKETS`.
    """

    __slots__ = (
        "_calls",
        "_end",
        "_failures",
        "_head",
        "_slot",
        "_start",
        "_width",
        "calls",
        "failures",
    )

    def __init__(self, seconds: float) -> None:
        self._width = seconds / BUCKETS
        self._calls = [0] * BUCKETS
        self._failures = [0] * BUCKETS
        self._head = 0
        self._slot = 0
        self._start = self._end = 0.0  # time span of the head bucket
        self.calls = 0
        self.failures = 0

    def record(self, now: float, failed: bool) -> None:
        # Most records land in the head bucket: skip the bucket arithmetic then.
        slot = self._slot if self._start <= now < self._end else self._advance(now)
        self._calls[slot] += 1
        self.calls += 1
        if failed:
            self._failures[slot] += 1
            self.failures += 1

    def counts(self, now: float) -> tuple[int, int]:
        """(calls, failures) in the window ending at `now`."""
        self._advance(now)
        return self.calls, self.failures

    def reset(self) -> None:
        for i in range(BUCKETS):
            self._calls[i] = self._failures[i] = 0
        self.calls = self.failures = 0

    def _advance(self, now: float) -> int:
        epoch = int(now // self._width)
        head = self._head
        if epoch > head:
            # Clear every slot whose bucket fell out of the window (all of them after a long gap).
            for e in range(max(head + 1, epoch - BUCKETS + 1), epoch + 1):
                i = e % BUCKETS
                self.calls -= self._calls[i]
                self.failures -= self._failures[i]
                self._calls[i] = self._failures[i] = 0
            self._move_head(epoch)
        elif epoch < head - BUCKETS + 1:
            # The clock went back further than the window: start over rather than miscount.
            self.reset()
            self._move_head(epoch)
        # A small step back (clock adjustment) counts in the newest bucket.
        return self._slot

    def _move_head(self, epoch: int) -> None:
        self._head = epoch
        self._slot = epoch % BUCKETS
        self._start = epoch * self._width
        self._end = self._start + self._width
