"""Unit-suite fixtures: the machine's environment never leaks into a test's configuration."""

from __future__ import annotations

import os

import pytest

from tests.helpers import FakeClock

# Flat names the package reads, plus the nested `__` forms pydantic-settings reads.
_ENV_NAMES = (
    "REDIS_URL",
    "CIRCUIT_BREAKER_ENABLED",
    "GATEWAY_BREAKER_CONFIG",
    "GATEWAY_BREAKER_ADMIN_TOKEN",
)
_ENV_PREFIXES = ("REDIS__", "CIRCUIT_BREAKER__", "METRICS__", "ADMIN__")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    for name in list(os.environ):
        upper = name.upper()
        if upper in ("REDIS", "CIRCUIT_BREAKER", "METRICS", "ADMIN") or upper.startswith(
            _ENV_PREFIXES
        ):
            monkeypatch.delenv(name, raising=False)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
