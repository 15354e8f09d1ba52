"""Fixtures for the fault tests: a fleet of managers, a delaying proxy, the e2e gateway factory.

The e2e suite's `upstream` and `start_gateway` fixtures are re-exported here, not copied, so the
gateway scenario starts example gateways exactly as tests/e2e does.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway_breaker import CircuitBreakerManager, Config
from tests.conftest import RedisServer
from tests.e2e.conftest import start_gateway, upstream
from tests.faults.proxy import DelayProxy
from tests.faults.support import FIGURES

__all__ = ["fleet", "proxy", "start_gateway", "upstream"]

_COLUMNS = {
    "test", "fault", "normal_p50_ms", "normal_p99_ms", "fault_p50_ms", "fault_p99_ms",
    "bound_ms", "calls_normal", "calls_fault", "probe_max_ms", "converge_ms",
}  # fmt: skip
StartFleet = Callable[[Config, int], Awaitable[list[CircuitBreakerManager]]]


@pytest.fixture
async def fleet() -> AsyncIterator[StartFleet]:
    """Starts `n` Redis-backed managers (`with_redis`) on one config; all closed at teardown."""
    created: list[CircuitBreakerManager] = []

    async def start(config: Config, n: int = 3) -> list[CircuitBreakerManager]:
        managers = [await CircuitBreakerManager.with_redis(config) for _ in range(n)]
        created.extend(managers)
        return managers

    yield start
    for manager in created:
        await manager.aclose()


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[DelayProxy]:
    """A delaying, blackholing TCP proxy in front of the test's own redis-server."""
    server = DelayProxy(redis_server.port)
    server.start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _no_stray_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Managers here get their settings from the test only, never from the shell."""
    for name in list(os.environ):
        upper = name.upper()
        if upper in ("REDIS_URL", "CIRCUIT_BREAKER_ENABLED", "GATEWAY_BREAKER_CONFIG") or (
            upper.startswith(("REDIS__", "CIRCUIT_BREAKER__"))
        ):
            monkeypatch.delenv(name)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The latency and convergence figures the fault tests measured (and asserted on).

    Set GATEWAY_BREAKER_FAULT_FIGURES=path to also get them as JSON.
    """
    if not FIGURES:
        return
    write = terminalreporter.write_line
    terminalreporter.section("fault figures (ms)")
    write(
        f"{'fault':<44} {'normal p50':>10} {'normal p99':>10} {'fault p50':>9} {'fault p99':>9}"
        f" {'bound':>7} {'calls':>6} {'probe max':>9} {'converge':>8}"
    )
    for f in FIGURES:
        probe = f.get("probe_max_ms")
        conv = f.get("converge_ms")
        write(
            f"{f['fault'][:44]:<44} {f['normal_p50_ms']:>10.3f} {f['normal_p99_ms']:>10.3f}"
            f" {f['fault_p50_ms']:>9.3f} {f['fault_p99_ms']:>9.3f} {f['bound_ms']:>7.2f}"
            f" {f['calls_fault']:>6} {'-' if probe is None else f'{probe:.1f}':>9}"
            f" {'-' if conv is None else f'{conv:.0f}':>8}"
        )
        extra = {k: v for k, v in f.items() if k not in _COLUMNS}
        if extra:
            write(f"    {extra}")
    if target := os.environ.get("GATEWAY_BREAKER_FAULT_FIGURES"):
        Path(target).write_text(json.dumps(FIGURES, indent=2) + "\n")
