"""The admin API's answers to odd values, and the headers every answer carries."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from gateway_breaker import CircuitBreakerManager, Config
from gateway_breaker.admin import admin_app
from tests.unit.support import make_config

TOKEN = "s3cret-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    manager = CircuitBreakerManager(make_config({"sona": {}}))
    await manager.start()
    app = admin_app(manager, token=TOKEN, path="/_breakers")
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://admin") as client:
            yield client
    finally:
        await manager.aclose()


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("GET", "/_breakers/breakers", AUTH),
        ("GET", "/_breakers/breakers", {}),
        ("GET", "/_breakers/breakers/nope", AUTH),
        ("GET", "/_breakers/nothing-here", AUTH),
        ("POST", "/_breakers/breakers", AUTH),
        ("GET", "/_breakers/", {}),
        ("GET", "/_breakers/static/dashboard.js", {}),
        ("GET", "/_breakers/openapi.json", {}),
        ("GET", "/_breakers", {}),
    ],
)
async def test_every_admin_answer_says_nosniff(
    client: httpx.AsyncClient, method: str, path: str, headers: dict[str, str]
) -> None:
    answer = await client.request(method, path, headers=headers)
    assert answer.headers["x-content-type-options"] == "nosniff"


async def test_the_dashboard_page_allows_no_inline_script_or_foreign_origin(
    client: httpx.AsyncClient,
) -> None:
    page = await client.get("/_breakers/")
    policy = page.headers["content-security-policy"]
    directives = {d.split()[0]: d.split()[1:] for d in policy.split(";") if d.strip()}
    assert directives["default-src"] == ["'self'"]
    for name in ("script-src", "style-src"):
        assert "'unsafe-inline'" not in directives.get(name, [])
    assert directives["frame-ancestors"] == ["'none'"]


@pytest.mark.parametrize("limit", ["²", "٣", "1e3", "-1", "", "9" * 30])
async def test_an_odd_history_limit_is_a_clear_answer(
    client: httpx.AsyncClient, limit: str
) -> None:
    answer = await client.get(f"/_breakers/breakers/sona/history?limit={limit}", headers=AUTH)
    assert answer.status_code in (400, 422)
    assert "limit" in answer.text


@pytest.mark.parametrize(
    "value", [b"\xb2", b"1\xb9", "é".encode(), "\uff11\uff12".encode(), b"\xff"]
)
async def test_a_non_ascii_last_event_id_is_refused(
    client: httpx.AsyncClient, value: bytes
) -> None:
    answer = await client.get(
        "/_breakers/events",
        headers=[*((k.encode(), v.encode()) for k, v in AUTH.items()), (b"last-event-id", value)],
    )
    assert answer.status_code in (400, 422)


async def test_metrics_answer_under_a_root_path() -> None:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from gateway_breaker import CircuitBreakerMiddleware

    async def fallback(request: object) -> PlainTextResponse:
        return PlainTextResponse("app", status_code=404)

    app = Starlette(routes=[Route("/{p:path}", fallback)])
    config = Config(circuit_breaker={"services": {"sona": {}}}, metrics={"enabled": True})
    app.add_middleware(CircuitBreakerMiddleware, config=config)
    transport = httpx.ASGITransport(app=app, root_path="/api")
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        answer = await client.get("/api/metrics")
        assert answer.status_code == 200
        assert "gateway_breaker_state" in answer.text


async def test_a_policy_patch_larger_than_any_instance_reads_back_is_413(
    client: httpx.AsyncClient,
) -> None:
    codes = list(range(500, 600)) * 30
    answer = await client.patch(
        "/_breakers/breakers/sona/policy", headers=AUTH, json={"failure_status_codes": codes}
    )
    assert answer.status_code == 413
    view = (await client.get("/_breakers/breakers/sona", headers=AUTH)).json()
    assert view["policy_overridden"] is False
