"""The middleware routes most requests by their first path segment: it must send every path
exactly where RouteTable.match and the operator surface say, first request and later ones,
whatever the prefixes (one segment, deeper, the root) and paths. Raw ASGI calls."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.types import Receive, Scope, Send

from gateway_breaker import CircuitBreakerManager, CircuitBreakerMiddleware, Config, RouteTable
from gateway_breaker.breaker import BreakerSnapshot, CircuitState
from tests.helpers import FakeClock
from tests.unit.support import asgi_get

SEGMENTS = ("a", "b", "ab", "metrics", "ops", "")


class App:
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"app"})


async def call(app: Any, path: str, root_path: str = "", kind: str = "http") -> tuple[int, bytes]:
    messages = await asgi_get(app, path, root_path=root_path, kind=kind)
    return int(messages[0]["status"]), b"".join(m.get("body", b"") for m in messages[1:])


def guarded(
    prefixes: list[str], enabled: bool = True, **settings_: Any
) -> CircuitBreakerMiddleware:
    """The middleware over App with every service's breaker open for a day."""
    clock = FakeClock()
    routes = {prefix: f"s{i}" for i, prefix in enumerate(prefixes)}
    config = Config(
        circuit_breaker={
            "enabled": enabled,
            "services": {
                s: {"prefix": f"/{s}", "timeout_seconds": 86_400} for s in routes.values()
            },
        },
        **settings_,
    )
    manager = CircuitBreakerManager(config, clock=clock)
    for service in routes.values():
        manager.get(service).restore(BreakerSnapshot(state=CircuitState.OPEN, opened_at=clock()))
    return CircuitBreakerMiddleware(App(), config=config, manager=manager, routes=routes)


def service_of(answer: tuple[int, bytes]) -> str | None:
    status, body = answer
    if status == 200:
        assert body == b"app"
        return None
    assert status == 503
    return str(json.loads(body)["service"])


prefixes = st.lists(
    st.lists(st.sampled_from(SEGMENTS[:-1]), min_size=0, max_size=3).map(
        lambda parts: "/" + "/".join(parts)
    ),
    min_size=1,
    max_size=5,
    unique=True,
)
paths = st.one_of(
    st.lists(st.sampled_from(SEGMENTS), min_size=0, max_size=4).map(
        lambda parts: "/" + "/".join(parts)
    ),
    st.sampled_from(["*", "a/b", "", "//a", "/a//b"]),
)


@settings(max_examples=150, deadline=None)
@given(prefixes=prefixes, paths=st.lists(paths, min_size=1, max_size=8))
async def test_every_path_goes_where_the_route_table_says(
    prefixes: list[str], paths: list[str]
) -> None:
    middleware = guarded(prefixes)
    table = RouteTable({prefix: f"s{i}" for i, prefix in enumerate(prefixes)})
    for path in paths + paths:  # the first request of a service binds it; then the fast path
        assert service_of(await call(middleware, path)) == table.match(path), path


async def test_a_prefix_below_the_admin_path_and_the_admin_path_share_a_segment() -> None:
    middleware = guarded(["/ops", "/a"], admin={"token": "t" * 32, "path": "/ops/breakers"})
    for _ in range(2):
        assert service_of(await call(middleware, "/ops/x")) == "s0"
        assert service_of(await call(middleware, "/a/x")) == "s1"
        status, _ = await call(middleware, "/ops/breakers/breakers")
        assert status == 401  # the admin API (no token sent), never the breaker or the app


async def test_the_metrics_path_is_served_before_a_route_that_covers_it() -> None:
    middleware = guarded(["/metrics", "/a"], metrics={"enabled": True})
    for _ in range(2):
        status, body = await call(middleware, "/metrics")
        assert status == 200
        assert b"gateway_breaker" in body
        assert service_of(await call(middleware, "/metrics/x")) == "s0"


async def test_below_a_root_path_the_prefixes_are_below_it() -> None:
    middleware = guarded(["/a"])
    for _ in range(2):
        assert service_of(await call(middleware, "/api/a/x", root_path="/api")) == "s0"
        assert service_of(await call(middleware, "/api/b", root_path="/api")) is None
        assert service_of(await call(middleware, "/a/x")) == "s0"


async def test_other_scope_types_and_a_disabled_gateway_pass_through() -> None:
    middleware = guarded(["/a"])
    assert service_of(await call(middleware, "/a/x")) == "s0"
    assert service_of(await call(middleware, "/a/x", kind="websocket")) is None
    disabled = guarded(["/a", "/"], enabled=False)
    for _ in range(2):
        assert service_of(await call(disabled, "/a/x")) is None
        assert service_of(await call(disabled, "/z")) is None


async def test_an_open_period_moved_by_the_fleet_is_answered_at_once() -> None:
    middleware = guarded(["/a"])
    breaker = middleware.manager.get("s0")
    now = breaker.clock()
    status, body = await call(middleware, "/a")
    assert json.loads(body)["retry_after"] == 86_400
    # Another instance's record: the same breaker opened 86,000 s ago (400 s left).
    breaker.restore(BreakerSnapshot(state=CircuitState.OPEN, opened_at=now - 86_000))
    status, body = await call(middleware, "/a")
    assert (status, json.loads(body)["retry_after"]) == (503, 400)
    # And one whose period is over: the next request is the probe, not a kept 503.
    breaker.restore(BreakerSnapshot(state=CircuitState.OPEN, opened_at=now - 86_400))
    assert (await call(middleware, "/a"))[0] == 200
