"""Shared test helpers: waiting on conditions with a deadline, never bare sleeps."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


async def wait_until(
    condition: Callable[[], bool | Awaitable[bool]],
    timeout: float = 5.0,
    interval: float = 0.005,
    message: str = "condition",
) -> float:
    """Poll `condition` until it holds; returns the seconds it took. Fails after `timeout`."""
    start = time.monotonic()
    deadline = start + timeout
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return time.monotonic() - start
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        await asyncio.sleep(interval)


def wait_until_sync(
    condition: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01, message: str = ""
) -> float:
    """`wait_until` for synchronous code (subprocesses, servers)."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {message or condition}")
        time.sleep(interval)
    return time.monotonic() - start


class FakeClock:
    """A clock for the state machine: time moves only when a test says so."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
