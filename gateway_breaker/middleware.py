"""CircuitBreakerMiddleware: pure ASGI; guards each configured route prefix with its breaker."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway_breaker.breaker import CircuitBreaker, CircuitState, Permit
from gateway_breaker.config import Config, check_service_name
from gateway_breaker.manager import CircuitBreakerManager
from gateway_breaker.rejection import OpenAnswer, Rejections
from gateway_breaker.routing import RouteTable

if TYPE_CHECKING:
    from gateway_breaker.admin.listener import AdminListener
    from gateway_breaker.metrics import MetricsApp

logger = logging.getLogger("gateway_breaker")
_OPEN = CircuitState.OPEN


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
        self._start_pending = self._owns_manager
        self._started: asyncio.Task[None] | None = None
        self._metrics: MetricsApp | None = None
        if config.metrics.enabled:
            from gateway_breaker.metrics import metrics_app

            self._metrics = metrics_app(manager, path=config.metrics.path)
        self._admin: ASGIApp | None = None  # the admin API, served only when a token is set
        self._admin_path = config.admin.path
        self._listener: AdminListener | None = None
        # Paths that belong to the operator surface: answered 404 here when it is served on
        # its own port or switched off, never passed to an upstream (a token may ride along).
        self._reserved: tuple[str, ...] = ()
        if config.admin.token is not None:
            self._reserved = (self._admin_path,)
        if self.enabled and config.admin.token is not None:
            from gateway_breaker.admin import admin_app

            self._admin = admin_app(manager, token=config.admin.token, path=self._admin_path)
        if self.enabled and config.admin.port is not None:
            moved = self._metrics if config.metrics.admin_port else None
            if self._admin is not None or moved is not None:
                self._listener = _admin_listener(config, self._admin, moved)
            self._admin = None  # on its own port only
            if moved is not None:
                self._metrics = None
                self._reserved += (config.metrics.path,)
        self._routes: dict[str, _Route] = {}  # by service, once a request has come for it
        self._fast, self._fast_default = self._first_segment_table()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The usual request (http, no root path) is routed by its first path segment: one split,
        # one dict probe. The operator surface, deeper prefixes, a root path and the other scope
        # types take the general path (`_general`), which answers them or names the service.
        if scope["type"] == "http" and not scope.get("root_path"):
            parts = scope["path"].split("/", 2)
            try:
                route = self._fast.get(parts[1], self._fast_default) if not parts[0] else _GENERAL
            except IndexError:  # no "/" at all (e.g. "*")
                route = _GENERAL
        else:
            route = _GENERAL
        if route is _GENERAL:
            route = await self._general(scope, receive, send)
            if route is None:
                return
        elif route is None:  # no prefix covers the path
            await self.app(scope, receive, send)
            return
        breaker = route.breaker
        if breaker.state is _OPEN and breaker.manual is None:
            # The load-shedding path: inside the open period, the kept 503 at once (counted as
            # rejected); at its end `acquire` lets the probe through.
            now = breaker.clock()
            kept = route.open_answer
            if kept is None or not (kept[0] == breaker.open_until and kept[1] <= now < kept[2]):
                kept = None
                if now < breaker.open_until:
                    kept = route.open_answer = _REJECTIONS.open_answer(
                        route.service, breaker.open_until, now
                    )
            if kept is not None:
                breaker.calls_rejected += 1
                # A copy of the kept list: an outer middleware may add to the headers it is sent.
                await send({"type": "http.response.start", "status": 503, "headers": kept[3][:]})
                await send({"type": "http.response.body", "body": kept[4]})
                return
        permit = breaker.acquire()
        if permit is None or (permit.probe and not await self.manager.admit_probe(breaker, permit)):
            await _reject(breaker, send)
            return

        call = _new_object(_Call)  # no __init__ call: the fields are set here
        call.breaker = breaker
        call.permit = permit
        call.receive = receive
        call.send = send
        call.status = 0
        call.complete = call.disconnected = False
        try:
            await self.app(scope, call.receive_watching, call.send_watching)
        except BaseException as exc:
            # A failure, unless the client left (Starlette raises ClientDisconnect when it reads
            # a body from a gone client) or the task was cancelled: then the permit goes back.
            if isinstance(exc, Exception) and not (
                call.disconnected or isinstance(exc, ClientDisconnect)
            ):
                breaker.record(permit, failed=True)
            breaker.release(permit)  # a no-op once the outcome is recorded
            raise
        if not call.complete:
            # The app returned without finishing a response: it saw the client leave (Starlette
            # stops a response on http.disconnect). That says nothing of the upstream.
            breaker.release(permit)

    async def _general(self, scope: Scope, receive: Receive, send: Send) -> _Route | None:
        """Answers everything but a request to guard (None), or gives its route. The first
        request to a service comes here: it starts the manager when no lifespan did, gets the
        breaker, and puts the route in the first-segment table."""
        metrics = self._metrics
        if metrics is not None and (  # before any prefix; also below a root path
            (here := scope.get("path")) == metrics.path
            or (here is not None and here.endswith(metrics.path) and _at(scope, metrics.path))
        ):
            await metrics(scope, receive, send)
            return None
        if scope["type"] != "http" or not self.enabled:
            if metrics is not None and scope["type"] == "lifespan":
                receive = metrics.watch_lifespan(receive)  # several workers: the exporter
            if scope["type"] == "lifespan" and self.enabled:
                await self._lifespan(scope, receive, send)
                return None
            if (
                self._reserved
                and scope["type"] == "http"
                and _under(_below_root(scope), self._reserved)
            ):
                await _not_here(send)
                return None
            await self.app(scope, receive, send)
            return None
        path: str = scope["path"]
        if scope.get("root_path"):
            path = _below_root(scope)
        # Segment boundary: /_breakers and /_breakers/..., not /_breakersx.
        if (
            self._admin is not None
            and path.startswith(admin := self._admin_path)
            and (len(path) == len(admin) or path[len(admin)] == "/")
        ):
            if self._start_pending:  # no lifespan ran: start before showing the breakers
                self._begin_start()
                assert self._started is not None
                await asyncio.shield(self._started)
            await self._admin(scope, receive, send)
            return None
        if (
            self._reserved
            and self._admin is None
            and path.startswith(self._reserved)
            and _under(path, self._reserved)
        ):
            await _not_here(send)
            return None
        service = self.routes.match(path)
        if service is None:
            await self.app(scope, receive, send)
            return None
        if self._start_pending:
            # No lifespan (some test clients, some servers): start in the background, never wait.
            self._begin_start()
        route = self._routes.get(service)
        if route is None:
            route = self._routes[service] = _Route(service, self.manager.get(service))
            self._fast, self._fast_default = self._first_segment_table()
        return route

    def _first_segment_table(self) -> tuple[dict[str, _Route], _Route | None]:
        """The routes by a path's first segment, and what every other segment gets. `_GENERAL`
        for the segments that begin a path of the operator surface or a deeper prefix, and for
        services no request has come for yet."""
        single, deeper, root = self.routes.first_segments()
        table: dict[str, _Route] = {}
        if self.enabled:
            routes = self._routes
            table.update((seg, routes.get(s, _GENERAL)) for seg, s in single.items())
        special = [*self._reserved, *deeper]
        if self._admin is not None:
            special.append(self._admin_path)
        if self._metrics is not None:
            special.append(self._metrics.path)
        for path in special:
            if not path.startswith("/"):
                return {}, _GENERAL  # never met in a request path: leave all to `_general`
            table[path.split("/", 2)[1]] = _GENERAL
        if not self.enabled or root is None:
            return table, None
        if root not in self._routes:
            return table, _GENERAL
        return table, self._routes[root]

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
            if message["type"] == "lifespan.startup" and self._listener is not None:
                await self._listener.start()
            return message

        async def send_lifespan(message: Message) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                if self._listener is not None:
                    await self._listener.stop()
                if self._owns_manager:
                    await self.manager.aclose()
            await send(message)

        await self.app(scope, receive_lifespan, send_lifespan)


_REJECTIONS = Rejections()


class _Route:
    """A guarded service: its breaker and, while it is open, the 503 kept for the current
    second of its open period."""

    __slots__ = ("breaker", "open_answer", "service")

    def __init__(self, service: str, breaker: CircuitBreaker) -> None:
        self.service = service
        self.breaker = breaker
        self.open_answer: OpenAnswer | None = None


# In the first-segment table: the segment needs the general path (never used as a route).
_GENERAL = object.__new__(_Route)


_new_object = object.__new__


class _Call:
    """One permitted call: the app's `receive` and `send` go through it, so that the status,
    the end of the response and a client that left are seen, and the outcome is recorded.

    An object with two methods rather than two closures: no cells, no functions made per
    request, and no coroutine of its own around the app.
    """

    __slots__ = ("breaker", "complete", "disconnected", "permit", "receive", "send", "status")
    breaker: CircuitBreaker
    permit: Permit
    receive: Receive
    send: Send
    status: int
    complete: bool
    disconnected: bool

    async def receive_watching(self) -> Message:
        message = await self.receive()
        if message["type"] == "http.disconnect":
            self.disconnected = True  # whatever the app answers now, nobody asked for it
        return message

    async def send_watching(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.status = message["status"]
        elif (
            (kind == "http.response.body" or kind == "http.response.zerocopysend")
            and not message.get("more_body", False)
        ) or kind == "http.response.pathsend":
            self.complete = True
            # Before the client has the whole response: its next request sees the outcome.
            breaker = self.breaker
            if self.disconnected:
                breaker.release(self.permit)  # e.g. a proxy's 499 for a client that left
            else:
                breaker.record(self.permit, self.status in breaker.failure_codes)
        try:
            await self.send(message)
        except OSError:
            self.disconnected = True  # ASGI 2.4: a send to a closed connection raises OSError
            raise


def _admin_listener(
    config: Config, admin: ASGIApp | None, metrics: MetricsApp | None
) -> AdminListener:
    """The admin listener's app: the admin API (when a token is set) and /metrics (if moved)."""
    from gateway_breaker.admin.listener import AdminListener

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if metrics is not None and _at(scope, metrics.path):
            await metrics(scope, receive, send)
        elif admin is not None:
            await admin(scope, receive, send)
        elif scope["type"] == "http":
            await _not_here(send)

    return AdminListener(app, config.admin.host, config.admin.port or 0)


def _at(scope: Scope, path: str) -> bool:
    """Whether the request is for `path` below the app's root path (if any)."""
    here = scope.get("path")
    return here == path or (
        here is not None and here.endswith(path) and here == scope.get("root_path", "") + path
    )


def _below_root(scope: Scope) -> str:
    """The request's path below the app's root path: mounted (or served with --root-path),
    the prefixes are below that root."""
    path: str = scope["path"]
    root = scope.get("root_path")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("/", ""):
        return path[len(root) :] or "/"
    return path


def _under(path: str, prefixes: tuple[str, ...]) -> bool:
    """Whether `path` is one of `prefixes` or below it (segment boundary)."""
    return any(
        p and path.startswith(p) and path[len(p) : len(p) + 1] in ("", "/") for p in prefixes
    )


async def _not_here(send: Send) -> None:
    body = b'{"type":"about:blank","title":"Not Found","status":404}'
    await send(
        {
            "type": "http.response.start",
            "status": 404,
            "headers": [
                (b"content-type", b"application/problem+json"),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
                (b"x-content-type-options", b"nosniff"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _reject(breaker: CircuitBreaker, send: Send) -> None:
    headers, body = _REJECTIONS.of(breaker)
    # A copy of the kept list: an outer middleware may add to the headers it is sent.
    await send({"type": "http.response.start", "status": 503, "headers": headers.copy()})
    await send({"type": "http.response.body", "body": body})
