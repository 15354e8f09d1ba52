"""Checked by mypy --strict (tests/unit/test_protect_typing.py): `protect` keeps signatures.

Each `assert_type` fails if a decorated function's type were lost, and each
`type: ignore[...]` is reported as unused (strict mode) if a wrong call were accepted.
"""

from __future__ import annotations

import asyncio
from typing import assert_type

import httpx

from gateway_breaker import BreakerTransport, CircuitBreakerManager, route_by_origin

manager = CircuitBreakerManager()


@manager.protect("auth")
def check(token: str, *, strict: bool = False) -> int:
    return len(token)


def anonymous(user_id: int) -> dict[str, int]:
    return {"id": 0}


@manager.protect("auth", fallback=anonymous, ignore=(KeyError,))
async def profile(user_id: int) -> dict[str, int]:
    return {"id": user_id}


def default_rate(currency: str) -> float:
    return 1.0


@manager.protect("rates", fallback=default_rate, ignore=lambda exc: isinstance(exc, LookupError))
def rate(currency: str) -> float:
    return 2.0


@manager.protect("rates")
async def convert(amount: float, currency: str = "EUR") -> float:
    return amount


assert_type(check("t"), int)
assert_type(check("t", strict=True), int)
assert_type(rate("EUR"), float)
check(1)  # type: ignore[arg-type]
check("t", loose=True)  # type: ignore[call-arg]
rate(currency=3)  # type: ignore[arg-type]
profile("1").close()  # type: ignore[arg-type]
convert(1.0, currency=2).close()  # type: ignore[arg-type]


@manager.protect("rates", fallback=default_rate)  # type: ignore[arg-type]
def wrong_fallback(amount: int) -> float:
    return 0.0


async def calls() -> None:
    assert_type(await profile(1), dict[str, int])
    assert_type(await convert(1.0), float)
    assert_type(await asyncio.create_task(profile(1)), dict[str, int])
    assert_type(await manager.call("auth", check, "t"), int)
    assert_type(await manager.call("auth", profile, 1, ignore=(KeyError,)), dict[str, int])
    assert_type(await manager.call("rates", rate, "EUR", ignore=ValueError), float)


def routed(request: httpx.Request) -> str | None:
    return "auth" if request.url.host == "auth.internal" else None


BreakerTransport(manager, service=routed)
BreakerTransport(manager, service=route_by_origin(manager), transport=httpx.AsyncHTTPTransport())
BreakerTransport(manager, service=3)  # type: ignore[arg-type]
