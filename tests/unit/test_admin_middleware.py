"""The middleware serves the admin API under admin.path only when admin.token is set."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway_breaker import CircuitBreakerMiddleware, Config, ConfigError

TOKEN = "middleware-admin-token-42"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Inner:
    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.app = Starlette(routes=[Route("/{path:path}", self.endpoint)])

    async def endpoint(self, request: Request) -> Response:
        self.calls[request.url.path] += 1
        return JSONResponse({"inner": request.url.path})


def config(**admin: Any) -> Config:
    services = {"sona": {}, "root": {"prefix": "/"}}
    return Config(circuit_breaker={"services": services}, admin=admin)


async def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")


@pytest.fixture
def inner() -> Inner:
    return Inner()


@pytest.fixture
async def served(inner: Inner) -> AsyncIterator[httpx.AsyncClient]:
    app = CircuitBreakerMiddleware(inner.app, config=config(token=TOKEN))
    async with await client_for(app) as client:
        yield client


async def test_served_under_the_path_and_never_a_service(
    served: httpx.AsyncClient, inner: Inner
) -> None:
    response = await served.get("/_breakers/breakers", headers=AUTH)
    assert response.status_code == 200
    assert {b["service"] for b in response.json()["breakers"]} == {"sona", "root"}
    assert (await served.get("/_breakers/breakers")).status_code == 401
    assert (await served.get("/_breakers/nothing", headers=AUTH)).status_code == 404
    assert (await served.get("/_breakers")).status_code == 308
    assert not inner.calls  # the "/" service's prefix covers everything, yet saw none of it

    # Beside it, other paths reach the app unchanged, under their breakers.
    assert (await served.get("/_breakersx/y")).json() == {"inner": "/_breakersx/y"}
    assert (await served.get("/sona/a")).json() == {"inner": "/sona/a"}
    assert inner.calls == {"/_breakersx/y": 1, "/sona/a": 1}


async def test_not_served_without_a_token(inner: Inner) -> None:
    app = CircuitBreakerMiddleware(inner.app, config=config())
    async with await client_for(app) as client:
        response = await client.get("/_breakers/breakers", headers=AUTH)
    assert response.json() == {"inner": "/_breakers/breakers"}


async def test_not_served_nor_passed_on_when_breakers_are_off(inner: Inner) -> None:
    off = Config(circuit_breaker={"enabled": False}, admin={"token": TOKEN})
    app = CircuitBreakerMiddleware(inner.app, config=off)
    async with await client_for(app) as client:
        response = await client.get("/_breakers/breakers", headers=AUTH)
        assert response.status_code == 404  # the token never reaches the app behind
        assert (await client.get("/sona/a")).json() == {"inner": "/sona/a"}
    assert inner.calls == {"/sona/a": 1}


async def test_another_path(inner: Inner) -> None:
    app = CircuitBreakerMiddleware(inner.app, config=config(token=TOKEN, path="/ops/cb/"))
    async with await client_for(app) as client:
        assert (await client.get("/ops/cb/breakers/sona", headers=AUTH)).status_code == 200
        assert (await client.get("/_breakers/breakers", headers=AUTH)).status_code == 200
        assert (await client.get("/_breakers/breakers")).json()["inner"] == "/_breakers/breakers"


def test_the_root_path_is_refused(inner: Inner) -> None:
    with pytest.raises(ConfigError, match=r"admin\.path"):
        CircuitBreakerMiddleware(inner.app, config=config(token=TOKEN, path="/"))


def test_the_token_comes_from_the_environment(
    inner: Inner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_BREAKER_ADMIN_TOKEN", TOKEN)
    middleware = CircuitBreakerMiddleware(inner.app)
    assert middleware.config.admin.token is not None
    assert TOKEN not in repr(middleware.config)
