"""Shared pieces of the integration tests: managers closed at teardown, a probe burst."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest

from gateway_breaker import CircuitBreakerManager, CircuitOpenError
from tests.helpers import wait_until


@pytest.fixture
async def managers() -> AsyncIterator[list[CircuitBreakerManager]]:
    """Managers a test creates; all closed at teardown."""
    created: list[CircuitBreakerManager] = []
    yield created
    for manager in created:
        await manager.aclose()


async def probe_burst(
    fleet: Sequence[CircuitBreakerManager], service: str, calls: int
) -> tuple[int, list[str]]:
    """`calls` concurrent calls spread over `fleet` to an upstream that answers only when all
    the others were rejected. Returns how many reached the upstream, and the results."""
    release = asyncio.Event()
    reached = 0

    async def upstream() -> str:
        nonlocal reached
        reached += 1
        await release.wait()
        return "ok"

    async def request(manager: CircuitBreakerManager) -> str:
        try:
            return await manager.call(service, upstream)
        except CircuitOpenError:
            return "rejected"

    burst = [asyncio.create_task(request(fleet[i % len(fleet)])) for i in range(calls)]
    await wait_until(lambda: sum(t.done() for t in burst) >= calls - 1, message="rejections")
    upstream_calls = reached
    release.set()
    return upstream_calls, list(await asyncio.gather(*burst))
