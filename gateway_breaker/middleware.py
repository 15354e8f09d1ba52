"""CircuitBreakerMiddleware: pure ASGI; guards each configured route prefix with its breaker."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway_breaker.breaker import CircuitBreaker
from gateway_breaker.config import Config, check_service_name
from gateway_breaker.manager import CircuitBreakerManager
from gateway_breaker.routing import RouteTable

if TYPE_CHECKING:
    from gateway_breaker.metrics import MetricsApp

logger = logging.getLogger("gateway_breaker")


class CircuitBreakerMiddleware:
    """Answers 503 for a service whose breaker is open; counts failures of the others.

    With no arguments, settings come from the environment and the YAML file named by
    GATEWAY_BREAKER_CONFIG, and state is shared through Redis when REDIS_URL is set. `config=`
    gives the settings, `manager=` an existing manager (its owner starts and closes it), and
    `routes=` maps prefixes to services in place of the configured prefixes.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        config: Config | None = None,
        manager: CircuitBreakerManager | None = None,
        routes: Mapping[str, str] | None = None,
    ) -> None:
        self.app = app
        if config is None:
            config = manager.config if manager is not None else Config()
        self.config = config
        self.enabled = config.circuit_breaker.enabled
        self._owns_manager = manager is None
        if manager is None:
            # The manager picks its store from the config: the middleware knows nothing of Redis.
            manager = CircuitBreakerManager.from_config(config)
        self.manager = manager
        self.routes = RouteTable(routes if routes is not None else config.circuit_breaker.routes())
        for service in self.routes.services():
            check_service_name(service)
        self._breakers: dict[str, CircuitBreaker] = {}
        self._start_pending = self._owns_manager
        self._started: asyncio.Task[None] | None = None
        self._metrics: MetricsApp | None = None
        if config.metrics.enabled:
            from gateway_breaker.metrics import metrics_app

            self._metrics = metrics_app(manager, path=config.metrics.path)
        self._admin: ASGIApp | None = None  # the admin API, served only when a token is set
        self._admin_path = config.admin.path
        if self.enabled and config.admin.token is not None:
            from gateway_breaker.admin import admin_app

            self._admin = admin_app(manager, token=config.admin.token, path=self._admin_path)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        metrics = self._metrics
        if metrics is not None and scope.get("path") == metrics.path:  # before any prefix
            await metrics(scope, receive, send)
            return
        if scope["type"] != "http" or not self.enabled:
            if metrics is not None and scope["type"] == "lifespan":
                receive = metrics.watch_lifespan(receive)  # several workers: the exporter
            if scope["type"] == "lifespan" and self.enabled:
                await self._lifespan(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        root = scope.get("root_path")
        if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("/", ""):
            # Mounted (or served with --root-path): the prefixes are below the app's root.
            path = path[len(root) :] or "/"
        admin = self._admin_path
        # Segment boundary: /_breakers and /_breakers/..., not /_breakersx.
        if (
            self._admin is not None
            and path.startswith(admin)
            and (len(path) == len(admin) or path[len(admin)] == "/")
        ):
            if self._start_pending:  # no lifespan ran: start before showing the breakers
                self._begin_start()
                assert self._started is not None
                await asyncio.shield(self._started)
            await self._admin(scope, receive, send)
            return
        service = self.routes.match(path)
        if service is None:
            await self.app(scope, receive, send)
            return
        if self._start_pending:
            # No lifespan (some test clients, some servers): start in the background, never wait.
            self._begin_start()
        breaker = self._breakers.get(service) or self._breaker(service)
        permit = breaker.acquire()
        if permit is None or (permit.probe and not await self.manager.admit_probe(breaker, permit)):
            await _reject(breaker, send)
            return

        status = 0
        complete = False
        disconnected = False
        failure_codes = breaker.failure_codes

        async def receive_watching() -> Message:
            nonlocal disconnected
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnected = True  # whatever the app answers now, nobody asked for it
            return message

        async def send_watching(message: Message) -> None:
            nonlocal status, complete, disconnected
            kind = message["type"]
            if kind == "http.response.start":
                status = message["status"]
            elif (
                kind == "http.response.body" and not message.get("more_body", False)
            ) or kind == "http.response.pathsend":
                complete = True
                # Before the client has the whole response: its next request sees the outcome.
                if disconnected:
                    breaker.release(permit)  # e.g. a proxy's 499 for a client that left
                else:
                    breaker.record(permit, status in failure_codes)
            try:
                await send(message)
            except OSError:
                disconnected = True  # ASGI 2.4: a send to a closed connection raises OSError
                raise

        try:
            await self.app(scope, receive_watching, send_watching)
        except BaseException as exc:
            # A failure, unless the client left (Starlette raises ClientDisconnect when it reads
            # a body from a gone client) or the task was cancelled: then the permit goes back.
            if isinstance(exc, Exception) and not (
                disconnected or isinstance(exc, ClientDisconnect)
            ):
                breaker.record(permit, failed=True)
            breaker.release(permit)  # a no-op once the outcome is recorded
            raise
        if not complete:
            # The app returned without finishing a response: it saw the client leave (Starlette
            # stops a response on http.disconnect). That says nothing of the upstream.
            breaker.release(permit)

    def _breaker(self, service: str) -> CircuitBreaker:
        breaker = self._breakers[service] = self.manager.get(service)
        return breaker

    def _begin_start(self) -> None:
        self._start_pending = False
        self._started = asyncio.ensure_future(self._start())

    async def _start(self) -> None:
        try:
            await self.manager.start(self.routes.services())
        except Exception:
            logger.exception("Circuit breaker manager failed to start")

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def receive_lifespan() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup" and self._start_pending:
                self._begin_start()
                assert self._started is not None
                await self._started
            return message

        async def send_lifespan(message: Message) -> None:
            if message["type"] == "lifespan.shutdown.complete" and self._owns_manager:
                await self.manager.aclose()
            await send(message)

        await self.app(scope, receive_lifespan, send_lifespan)


async def _reject(breaker: CircuitBreaker, send: Send) -> None:
    retry_after = breaker.retry_after_header()
    name, state = breaker.name, breaker.effective_state
    if state == "closed":
        # Closed: the adaptive mode shed this request, or the recovery ramp did not admit it.
        state = "shedding" if breaker.shed_last else "recovering"
    # Service names are validated (letters, digits, '_', '.', '-'): nothing to escape.
    body = (
        '{"type":"about:blank","title":"Service Unavailable","status":503,'
        f'"detail":"Circuit breaker for service \'{name}\' is {state}",'
        f'"service":"{name}","state":"{state}","retry_after":{retry_after}}}'
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/problem+json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(retry_after).encode()),
                (b"cache-control", b"no-store"),
                (b"x-circuit-breaker", state.encode()),  # tells breaker 503s from upstream 503s
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
