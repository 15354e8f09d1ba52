"""The middleware under tricks and odd-but-legal servers: mounted apps, root paths, files sent
with `http.response.pathsend`, clients that leave before the answer."""

from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.types import Receive, Scope, Send

from gateway_breaker import CircuitBreakerManager, CircuitBreakerMiddleware, CircuitState
from tests.helpers import FakeClock
from tests.unit.support import make_config
from tests.unit.test_middleware import (
    SERVICES,
    Sink,
    Upstream,
    assert_probe_slot_free,
    disconnect_at_once,
    disconnect_never,
    half_open_manager,
    http_scope,
)


def root_scope(path: str, root_path: str) -> Scope:
    return {**http_scope(path), "root_path": root_path}


async def test_a_mounted_gateway_keeps_its_breakers(clock: FakeClock) -> None:
    upstream = Upstream()
    manager = CircuitBreakerManager(make_config(SERVICES), clock=clock)
    guarded = CircuitBreakerMiddleware(upstream.app, manager=manager)
    app = Starlette(routes=[Mount("/api", app=guarded)])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        upstream.status = 500
        for _ in range(2):
            assert (await client.get("/api/sona/x")).status_code == 500
        assert manager.get("sona").state is CircuitState.OPEN
        calls = upstream.total()
        assert (await client.get("/api/sona/x")).status_code == 503
        assert upstream.total() == calls
        # A nested prefix is found below the root too.
        upstream.status = 429
        for _ in range(2):
            assert (await client.get("/api/api/auth/login")).status_code == 429
        assert manager.get("auth").state is CircuitState.OPEN


@pytest.mark.parametrize(
    ("path", "root_path", "service"),
    [
        ("/api/sona/x", "/api", "sona"),  # --root-path /api: ASGI path includes the root
        ("/api/sona", "/api/", None),  # a root with a trailing slash is no segment boundary
        ("/gw/v1/discovery", "/gw/v1", "discovery"),
        ("/sona/x", "/api", "sona"),  # a server that leaves the root out of path
        ("/apix/sona", "/api", None),  # not below the root: routed as it is
        ("/api", "/api", None),  # the root itself
        ("/sona", "", "sona"),
    ],
)
async def test_routing_is_below_the_root_path(
    clock: FakeClock, path: str, root_path: str, service: str | None
) -> None:
    manager = CircuitBreakerManager(make_config(SERVICES), clock=clock)

    async def fails(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 500, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = CircuitBreakerMiddleware(fails, manager=manager)
    await middleware(root_scope(path, root_path), disconnect_never(), Sink())
    charged = {name for name, b in manager.breakers().items() if b.failure_count}
    assert charged == ({service} if service else set())


@pytest.mark.parametrize(
    ("status", "state"), [(500, CircuitState.OPEN), (200, CircuitState.CLOSED)]
)
async def test_a_file_sent_with_pathsend_is_recorded(
    clock: FakeClock, status: int, state: CircuitState
) -> None:
    manager = half_open_manager(clock)

    async def sends_a_file(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.pathsend", "path": "/srv/file.bin"})

    middleware = CircuitBreakerMiddleware(sends_a_file, manager=manager)
    sink = Sink()
    await middleware(http_scope("/sona/file.bin"), disconnect_never(), sink)
    assert [m["type"] for m in sink.messages][-1] == "http.response.pathsend"
    assert manager.get("sona").state is state


@pytest.mark.parametrize(
    ("status", "state"), [(500, CircuitState.OPEN), (200, CircuitState.CLOSED)]
)
async def test_a_file_sent_with_zerocopysend_is_recorded(
    clock: FakeClock, status: int, state: CircuitState
) -> None:
    manager = half_open_manager(clock)

    async def sends_a_file(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": status, "headers": []})
        # The ASGI zero-copy send extension: the last message has no more_body.
        await send({"type": "http.response.zerocopysend", "file": 3, "count": 5, "more_body": True})
        assert manager.get("sona").state is CircuitState.HALF_OPEN  # not the end yet
        await send({"type": "http.response.zerocopysend", "file": 3, "offset": 5})

    middleware = CircuitBreakerMiddleware(sends_a_file, manager=manager)
    sink = Sink()
    await middleware(http_scope("/sona/file.bin"), disconnect_never(), sink)
    assert [m["type"] for m in sink.messages][-1] == "http.response.zerocopysend"
    assert manager.get("sona").state is state


async def answers_499_to_a_client_that_left(scope: Scope, receive: Receive, send: Send) -> None:
    """What a proxy does when its client leaves mid-upload: it answers for the record."""
    message = await receive()
    assert message["type"] == "http.disconnect"
    await send({"type": "http.response.start", "status": 499, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def test_an_answer_to_a_client_that_left_does_not_close_a_half_open_breaker(
    clock: FakeClock,
) -> None:
    manager = half_open_manager(clock)
    middleware = CircuitBreakerMiddleware(answers_499_to_a_client_that_left, manager=manager)
    await middleware(http_scope("/sona/x"), disconnect_at_once(), Sink())
    breaker = manager.get("sona")
    assert breaker.state is CircuitState.HALF_OPEN, "a client that left closed the breaker"
    assert_probe_slot_free(breaker)


async def test_an_answer_to_a_client_that_left_keeps_the_failure_count(clock: FakeClock) -> None:
    manager = CircuitBreakerManager(
        make_config({"sona": {"failure_threshold": 3, "timeout_seconds": 10}}), clock=clock
    )
    breaker = manager.get("sona")
    for _ in range(2):
        breaker.record(breaker.acquire(), failed=True)  # type: ignore[arg-type]
    middleware = CircuitBreakerMiddleware(answers_499_to_a_client_that_left, manager=manager)
    await middleware(http_scope("/sona/x"), disconnect_at_once(), Sink())
    assert breaker.failure_count == 2
