"""CircuitBreakerMiddleware on small Starlette apps, through httpx and through raw ASGI calls."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway_breaker import (
    CircuitBreaker,
    CircuitBreakerManager,
    CircuitBreakerMiddleware,
    CircuitState,
    Permit,
)
from tests.helpers import FakeClock, wait_until
from tests.unit.support import make_config

SERVICES: dict[str, dict[str, Any]] = {
    "sona": {"failure_threshold": 2, "timeout_seconds": 10, "half_open_max_calls": 1},
    "discovery": {"failure_threshold": 2, "timeout_seconds": 10},
    "auth": {"prefix": "/api/auth", "failure_threshold": 2, "failure_status_codes": [429]},
}


class Boom(Exception):
    pass


class Upstream:
    """A Starlette app standing in for the gateway's proxy: counts calls, answers as told."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.status = 200
        self.error: Exception | None = None
        self.started = asyncio.Event()
        self.go = asyncio.Event()
        self.go.set()
        self.app = Starlette(routes=[Route("/{path:path}", self.endpoint, methods=["GET", "POST"])])

    async def endpoint(self, request: Request) -> Response:
        self.calls[request.url.path] += 1
        self.started.set()
        await self.go.wait()
        if self.error is not None:
            raise self.error
        return JSONResponse({"path": request.url.path}, status_code=self.status)

    def total(self) -> int:
        return sum(self.calls.values())


@pytest.fixture
def upstream() -> Upstream:
    return Upstream()


@pytest.fixture
def manager(clock: FakeClock) -> CircuitBreakerManager:
    return CircuitBreakerManager(make_config(SERVICES), clock=clock)


@pytest.fixture
async def client(
    upstream: Upstream, manager: CircuitBreakerManager
) -> AsyncIterator[httpx.AsyncClient]:
    app = CircuitBreakerMiddleware(upstream.app, manager=manager)
    async with http_client(app) as c:
        yield c


def http_client(app: ASGIApp) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")


async def open_breaker(
    client: httpx.AsyncClient, upstream: Upstream, path: str = "/sona/x", times: int = 2
) -> None:
    upstream.status = 500
    for _ in range(times):
        assert (await client.get(path)).status_code == 500
    upstream.status = 200


def assert_rejected(response: httpx.Response, service: str, state: str) -> None:
    assert response.status_code == 503
    retry_after = response.headers["retry-after"]
    assert retry_after.isdigit(), retry_after
    assert int(retry_after) >= 1
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["service"] == service
    assert body["state"] == state
    assert body["status"] == 503
    assert service in body["detail"]


# -- open: 503 at once -----------------------------------------------------------------------


async def test_open_breaker_answers_503_without_calling_the_app(
    client: httpx.AsyncClient, upstream: Upstream, manager: CircuitBreakerManager
) -> None:
    await open_breaker(client, upstream)
    assert manager.get("sona").state is CircuitState.OPEN
    before = upstream.total()
    for path in ("/sona", "/sona/x", "/sona/deep/path?q=1"):
        assert_rejected(await client.get(path), "sona", "open")
        assert_rejected(await client.post(path, content=b"payload"), "sona", "open")
    assert upstream.total() == before


async def test_retry_after_counts_down_in_whole_seconds(
    client: httpx.AsyncClient, upstream: Upstream, clock: FakeClock
) -> None:
    await open_breaker(client, upstream)
    assert (await client.get("/sona")).headers["retry-after"] == "10"
    clock.advance(2.5)
    response = await client.get("/sona")
    assert response.headers["retry-after"] == "8"
    assert response.json()["retry_after"] == 8
    clock.advance(7.4)
    assert (await client.get("/sona")).headers["retry-after"] == "1"


async def test_after_the_timeout_a_probe_closes_the_breaker(
    client: httpx.AsyncClient, upstream: Upstream, clock: FakeClock, manager: CircuitBreakerManager
) -> None:
    await open_breaker(client, upstream)
    clock.advance(10)
    assert (await client.get("/sona/x")).status_code == 200
    assert manager.get("sona").state is CircuitState.CLOSED
    assert (await client.get("/sona/x")).status_code == 200


async def test_failed_probe_reopens_the_breaker(
    client: httpx.AsyncClient, upstream: Upstream, clock: FakeClock, manager: CircuitBreakerManager
) -> None:
    await open_breaker(client, upstream)
    clock.advance(10)
    upstream.status = 502
    assert (await client.get("/sona/x")).status_code == 502
    assert manager.get("sona").state is CircuitState.OPEN
    assert_rejected(await client.get("/sona/x"), "sona", "open")


async def test_half_open_with_the_probe_out_answers_503_half_open(
    client: httpx.AsyncClient, upstream: Upstream, clock: FakeClock
) -> None:
    await open_breaker(client, upstream)
    clock.advance(10)
    upstream.go.clear()
    upstream.started.clear()
    probe = asyncio.create_task(client.get("/sona/probe"))
    await wait_until(upstream.started.is_set, message="probe reached the app")
    before = upstream.total()
    assert_rejected(await client.get("/sona/other"), "sona", "half_open")
    assert upstream.total() == before
    upstream.go.set()
    assert (await probe).status_code == 200


# -- what counts -----------------------------------------------------------------------------


async def test_4xx_are_successes(
    client: httpx.AsyncClient, upstream: Upstream, manager: CircuitBreakerManager
) -> None:
    for status in (400, 401, 404, 409, 429, 499):
        upstream.status = status
        for _ in range(3):
            assert (await client.get("/sona/x")).status_code == status
    breaker = manager.get("sona")
    assert breaker.state is CircuitState.CLOSED
    assert breaker.failure_count == 0


async def test_5xx_are_failures(
    client: httpx.AsyncClient, upstream: Upstream, manager: CircuitBreakerManager
) -> None:
    upstream.status = 503
    assert (await client.get("/sona/x")).status_code == 503
    assert manager.get("sona").failure_count == 1


async def test_configured_failure_status_codes(
    client: httpx.AsyncClient, upstream: Upstream, manager: CircuitBreakerManager
) -> None:
    upstream.status = 500  # not a failure for auth
    for _ in range(3):
        assert (await client.get("/api/auth/login")).status_code == 500
    assert manager.get("auth").state is CircuitState.CLOSED
    upstream.status = 429
    for _ in range(2):
        assert (await client.get("/api/auth/login")).status_code == 429
    assert manager.get("auth").state is CircuitState.OPEN
    assert_rejected(await client.get("/api/auth/login"), "auth", "open")


async def test_exceptions_from_the_app_count_and_propagate(
    client: httpx.AsyncClient, upstream: Upstream, manager: CircuitBreakerManager
) -> None:
    upstream.error = Boom("proxy blew up")
    with pytest.raises(Boom):
        await client.get("/sona/x")
    assert manager.get("sona").failure_count == 1
    with pytest.raises(Boom):
        await client.get("/sona/x")
    assert manager.get("sona").state is CircuitState.OPEN
    calls = upstream.total()
    assert_rejected(await client.get("/sona/x"), "sona", "open")
    assert upstream.total() == calls


async def test_exception_from_a_raw_app_propagates_and_counts(clock: FakeClock) -> None:
    manager = CircuitBreakerManager(make_config(SERVICES), clock=clock)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise Boom("no response at all")

    middleware = CircuitBreakerMiddleware(app, manager=manager)
    with pytest.raises(Boom):
        await middleware(http_scope("/sona"), disconnect_never(), Sink())
    assert manager.get("sona").failure_count == 1


async def test_app_that_returns_without_answering_counts_for_nothing(clock: FakeClock) -> None:
    """Returning without a whole response is what an app does when it sees the client leave
    (Starlette stops a response on http.disconnect): no outcome, and no probe slot kept."""
    manager = CircuitBreakerManager(make_config(SERVICES), clock=clock)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        return None

    middleware = CircuitBreakerMiddleware(app, manager=manager)
    breaker = manager.get("sona")
    for _ in range(10):
        await middleware(http_scope("/sona"), disconnect_never(), Sink())
    assert (breaker.failure_count, breaker.success_count) == (0, 0)
    assert breaker._window.calls == 0


# -- routing ---------------------------------------------------------------------------------


async def test_other_paths_pass_through_even_while_open(
    client: httpx.AsyncClient, upstream: Upstream, manager: CircuitBreakerManager
) -> None:
    await open_breaker(client, upstream)
    for path in ("/", "/other", "/sonar", "/sonar/x", "/healthz", "/discovery/ok"):
        response = await client.get(path)
        assert response.status_code == 200, path
        assert response.json() == {"path": path}
    assert manager.get("discovery").state is CircuitState.CLOSED


async def test_unmatched_paths_never_touch_a_breaker(
    client: httpx.AsyncClient, upstream: Upstream, manager: CircuitBreakerManager
) -> None:
    upstream.status = 500
    for _ in range(5):
        assert (await client.get("/discoveryx")).status_code == 500
        assert (await client.get("/discoveryx/y")).status_code == 500
        assert (await client.get("/elsewhere")).status_code == 500
    assert manager.get("discovery").state is CircuitState.CLOSED
    assert manager.get("discovery").failure_count == 0
    upstream.status = 200
    assert (await client.get("/discovery")).status_code == 200


async def test_discoveryx_is_not_guarded_by_discovery(
    client: httpx.AsyncClient, upstream: Upstream
) -> None:
    await open_breaker(client, upstream, "/discovery/x")
    assert_rejected(await client.get("/discovery"), "discovery", "open")
    assert (await client.get("/discoveryx")).status_code == 200


async def test_routes_kwarg_replaces_the_configured_prefixes(
    upstream: Upstream, manager: CircuitBreakerManager
) -> None:
    app = CircuitBreakerMiddleware(
        upstream.app, manager=manager, routes={"/api/v2": "sona", "/api": "discovery"}
    )
    async with http_client(app) as client:
        await open_breaker(client, upstream, "/api/v2/items")
        assert_rejected(await client.get("/api/v2"), "sona", "open")
        assert (await client.get("/api/v1/items")).status_code == 200  # discovery, closed
        assert (await client.get("/sona/x")).status_code == 200  # no longer a guarded prefix
        assert (await client.get("/api/v2x")).status_code == 200


async def test_routes_kwarg_with_a_service_that_is_not_configured(upstream: Upstream) -> None:
    config = make_config({}, defaults={"failure_threshold": 1, "timeout_seconds": 60})
    app = CircuitBreakerMiddleware(upstream.app, config=config, routes={"/media": "media"})
    async with http_client(app) as client:
        upstream.status = 500
        assert (await client.get("/media/a")).status_code == 500
        assert_rejected(await client.get("/media/b"), "media", "open")


async def test_manager_kwarg_shares_the_managers_breakers(
    upstream: Upstream, manager: CircuitBreakerManager
) -> None:
    app = CircuitBreakerMiddleware(upstream.app, manager=manager)
    assert app.manager is manager
    breaker = manager.get("sona")
    for _ in range(2):
        breaker.record(breaker.acquire(), failed=True)  # type: ignore[arg-type]
    async with http_client(app) as client:
        assert_rejected(await client.get("/sona"), "sona", "open")
    assert upstream.total() == 0


async def test_config_kwarg(upstream: Upstream) -> None:
    config = make_config({"sona": {"failure_threshold": 1, "timeout_seconds": 60}})
    app = CircuitBreakerMiddleware(upstream.app, config=config)
    async with http_client(app) as client:
        upstream.status = 500
        assert (await client.get("/sona")).status_code == 500
        assert_rejected(await client.get("/sona"), "sona", "open")
    assert app.manager.shared is False


# -- construction from the environment -------------------------------------------------------


async def test_add_middleware_without_arguments_reads_gateway_breaker_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, upstream: Upstream
) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(
        "circuit_breaker:\n"
        "  services:\n"
        "    sona:\n"
        "      prefix: /media/sona\n"
        "      failure_threshold: 2\n"
        "      timeout_seconds: 60\n"
    )
    monkeypatch.setenv("GATEWAY_BREAKER_CONFIG", str(path))
    upstream.app.add_middleware(CircuitBreakerMiddleware)
    async with http_client(upstream.app) as client:
        await open_breaker(client, upstream, "/media/sona/x")
        before = upstream.total()
        assert_rejected(await client.get("/media/sona/y"), "sona", "open")
        assert upstream.total() == before
        assert (await client.get("/sona")).status_code == 200  # the prefix is the file's


async def test_disabled_passes_everything_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, upstream: Upstream
) -> None:
    monkeypatch.setenv("CIRCUIT_BREAKER_ENABLED", "false")
    monkeypatch.setenv("CIRCUIT_BREAKER__SERVICES__SONA__FAILURE_THRESHOLD", "1")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")  # never dialled
    middleware = CircuitBreakerMiddleware(upstream.app)
    assert middleware.manager.shared is False
    upstream.status = 500
    async with http_client(middleware) as client:
        for _ in range(10):
            assert (await client.get("/sona/x")).status_code == 500
    assert upstream.calls["/sona/x"] == 10
    assert middleware.manager.breakers() == {}


async def test_disabled_passes_lifespan_through_without_starting_anything(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CIRCUIT_BREAKER_ENABLED", "false")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    inner = LifespanApp()
    middleware = CircuitBreakerMiddleware(inner)
    sent = await run_lifespan(middleware)
    assert inner.received == ["lifespan.startup", "lifespan.shutdown"]
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert middleware.manager.shared is False


# -- raw ASGI: other scopes, disconnects, cancellation ---------------------------------------


def http_scope(path: str) -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"gateway")],
        "client": ("127.0.0.1", 50000),
        "server": ("gateway", 80),
    }


class Sink:
    """An ASGI `send` that keeps what it is sent."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def __call__(self, message: Message) -> None:
        self.messages.append(message)

    @property
    def status(self) -> int | None:
        for message in self.messages:
            if message["type"] == "http.response.start":
                return int(message["status"])
        return None


class ClosedConnectionSend(Sink):
    """A `send` whose client has gone: ASGI 2.4 servers raise an OSError subclass."""

    async def __call__(self, message: Message) -> None:
        raise ConnectionResetError("client went away")


def disconnect_never() -> Receive:
    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    return receive


def disconnect_at_once() -> Receive:
    async def receive() -> Message:
        return {"type": "http.disconnect"}

    return receive


def half_open_manager(clock: FakeClock, **policy: Any) -> CircuitBreakerManager:
    """A manager whose `sona` breaker is half-open with its one probe slot free."""
    services = {"sona": {**SERVICES["sona"], **policy}}
    manager = CircuitBreakerManager(make_config(services), clock=clock)
    breaker = manager.get("sona")
    for _ in range(breaker.policy.failure_threshold):
        breaker.record(breaker.acquire(), failed=True)  # type: ignore[arg-type]
    clock.advance(breaker.policy.timeout_seconds)
    return manager


def assert_probe_slot_free(breaker: CircuitBreaker) -> None:
    assert breaker.state is CircuitState.HALF_OPEN
    permit = breaker.acquire()
    assert permit is not None, "a half-open probe permit was left taken"
    breaker.release(permit)


async def reads_body_via_starlette(scope: Scope, receive: Receive, send: Send) -> None:
    """Reads the body the usual way; a gone client makes Starlette raise ClientDisconnect."""
    request = Request(scope, receive)
    body = await request.body()
    await Response(body, status_code=200)(scope, receive, send)


async def gives_up_silently(scope: Scope, receive: Receive, send: Send) -> None:
    message = await receive()
    assert message["type"] == "http.disconnect"


async def starts_then_sees_disconnect(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"part", "more_body": True})
    message = await receive()
    assert message["type"] == "http.disconnect"


async def starts_500_then_sees_disconnect(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 500, "headers": []})
    message = await receive()
    assert message["type"] == "http.disconnect"


DISCONNECTING_APPS = [
    reads_body_via_starlette,
    gives_up_silently,
    starts_then_sees_disconnect,
    starts_500_then_sees_disconnect,
]


@pytest.mark.parametrize("app", DISCONNECTING_APPS)
async def test_client_disconnect_is_not_a_failure(clock: FakeClock, app: ASGIApp) -> None:
    manager = CircuitBreakerManager(
        make_config({"sona": {"failure_threshold": 1, "timeout_seconds": 10}}), clock=clock
    )
    middleware = CircuitBreakerMiddleware(app, manager=manager)
    for _ in range(3):
        # A disconnect may surface as the app's own exception; nothing else may escape.
        with contextlib.suppress(ClientDisconnect):
            await middleware(http_scope("/sona/x"), disconnect_at_once(), Sink())
    breaker = manager.get("sona")
    assert breaker.state is CircuitState.CLOSED
    assert breaker.failure_count == 0


@pytest.mark.parametrize("app", DISCONNECTING_APPS)
async def test_client_disconnect_frees_the_half_open_probe(clock: FakeClock, app: ASGIApp) -> None:
    manager = half_open_manager(clock)
    middleware = CircuitBreakerMiddleware(app, manager=manager)
    with contextlib.suppress(ClientDisconnect):
        await middleware(http_scope("/sona/x"), disconnect_at_once(), Sink())
    assert_probe_slot_free(manager.get("sona"))


async def test_disconnect_after_the_response_completed_still_counts_the_response(
    clock: FakeClock,
) -> None:
    manager = CircuitBreakerManager(
        make_config({"sona": {"failure_threshold": 1, "timeout_seconds": 10}}), clock=clock
    )

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 502, "headers": []})
        await send({"type": "http.response.body", "body": b"bad gateway"})
        await receive()  # the client leaves once it has the whole answer

    middleware = CircuitBreakerMiddleware(app, manager=manager)
    await middleware(http_scope("/sona"), disconnect_at_once(), Sink())
    assert manager.get("sona").state is CircuitState.OPEN


async def test_client_gone_on_send_is_not_a_failure(clock: FakeClock) -> None:
    """ASGI 2.4: a server reports a closed connection by raising OSError from `send`."""
    manager = half_open_manager(clock)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = CircuitBreakerMiddleware(app, manager=manager)
    with pytest.raises(OSError, match="client went away"):
        await middleware(http_scope("/sona"), disconnect_never(), ClosedConnectionSend())
    breaker = manager.get("sona")
    assert breaker.state is CircuitState.HALF_OPEN, "a client that left reopened the breaker"
    assert_probe_slot_free(breaker)


class BlockingApp:
    """An ASGI app that starts and then waits forever (until cancelled)."""

    def __init__(self) -> None:
        self.started = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.started = True
        await asyncio.Event().wait()


async def test_cancelled_request_is_not_a_failure(clock: FakeClock) -> None:
    manager = CircuitBreakerManager(
        make_config({"sona": {"failure_threshold": 1, "timeout_seconds": 10}}), clock=clock
    )
    for _ in range(3):
        app = BlockingApp()
        middleware = CircuitBreakerMiddleware(app, manager=manager)
        task = asyncio.create_task(middleware(http_scope("/sona"), disconnect_never(), Sink()))
        await wait_until(lambda a=app: a.started, message="request reached the app")  # type: ignore[misc]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    breaker = manager.get("sona")
    assert breaker.state is CircuitState.CLOSED
    assert breaker.failure_count == 0


async def test_cancelled_probe_frees_its_half_open_slot(clock: FakeClock) -> None:
    manager = half_open_manager(clock)
    app = BlockingApp()
    middleware = CircuitBreakerMiddleware(app, manager=manager)
    task = asyncio.create_task(middleware(http_scope("/sona"), disconnect_never(), Sink()))
    await wait_until(lambda: app.started, message="probe reached the app")
    rejected = Sink()
    await middleware(http_scope("/sona"), disconnect_never(), rejected)
    assert rejected.status == 503  # the probe holds the only slot
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert_probe_slot_free(manager.get("sona"))


class SlowLeaseManager(CircuitBreakerManager):
    """A manager whose fleet-wide probe lease takes a round trip, as it does with Redis."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.leasing = False

    async def lease_probe(self, breaker: CircuitBreaker, permit: Permit) -> bool:
        self.leasing = True
        await asyncio.Event().wait()
        return True


async def test_request_cancelled_while_leasing_the_probe_frees_its_slot(clock: FakeClock) -> None:
    manager = SlowLeaseManager(make_config({"sona": SERVICES["sona"]}), clock=clock)
    breaker = manager.get("sona")
    for _ in range(2):
        breaker.record(breaker.acquire(), failed=True)  # type: ignore[arg-type]
    clock.advance(10)
    app = BlockingApp()
    middleware = CircuitBreakerMiddleware(app, manager=manager)
    task = asyncio.create_task(middleware(http_scope("/sona"), disconnect_never(), Sink()))
    await wait_until(lambda: manager.leasing, message="probe lease requested")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert app.started is False
    assert_probe_slot_free(breaker)


class RecordingApp:
    def __init__(self) -> None:
        self.scopes: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scopes.append(scope["type"])
        message = await receive()
        assert message["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})


async def test_websocket_scope_passes_through_even_while_open(clock: FakeClock) -> None:
    manager = half_open_manager(clock)
    breaker = manager.get("sona")
    breaker.record(breaker.acquire(), failed=True)  # type: ignore[arg-type]
    assert breaker.state is CircuitState.OPEN
    inner = RecordingApp()
    middleware = CircuitBreakerMiddleware(inner, manager=manager)
    sent = Sink()

    async def receive() -> Message:
        return {"type": "websocket.connect"}

    scope = {"type": "websocket", "path": "/sona/live", "headers": [], "query_string": b""}
    await middleware(scope, receive, sent)
    assert inner.scopes == ["websocket"]
    assert sent.messages == [{"type": "websocket.accept"}]
    assert breaker.state is CircuitState.OPEN


class LifespanApp:
    def __init__(self) -> None:
        self.received: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "lifespan"
        while True:
            message = await receive()
            self.received.append(message["type"])
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return


async def run_lifespan(app: ASGIApp) -> list[Message]:
    incoming: asyncio.Queue[Message] = asyncio.Queue()
    incoming.put_nowait({"type": "lifespan.startup"})
    incoming.put_nowait({"type": "lifespan.shutdown"})
    sent = Sink()
    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
    await app(scope, incoming.get, sent)
    return sent.messages


async def test_lifespan_passes_through_and_starts_configured_breakers() -> None:
    inner = LifespanApp()
    middleware = CircuitBreakerMiddleware(inner, config=make_config(SERVICES))
    sent = await run_lifespan(middleware)
    assert inner.received == ["lifespan.startup", "lifespan.shutdown"]
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert set(middleware.manager.breakers()) == set(SERVICES)


async def test_lifespan_with_a_given_manager_passes_through(
    manager: CircuitBreakerManager,
) -> None:
    inner = LifespanApp()
    middleware = CircuitBreakerMiddleware(inner, manager=manager)
    sent = await run_lifespan(middleware)
    assert inner.received == ["lifespan.startup", "lifespan.shutdown"]
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


async def test_problem_body_is_valid_json_with_a_content_length(
    client: httpx.AsyncClient, upstream: Upstream
) -> None:
    await open_breaker(client, upstream)
    response = await client.get("/sona")
    assert int(response.headers["content-length"]) == len(response.content)
    assert json.loads(response.content)["title"]
