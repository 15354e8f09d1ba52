"""The example gateway: proxies each configured service, guarded by its circuit breaker.

Run it from the repository root with `uvicorn examples.gateway:app`. Settings come from
`gateway_breaker.Config()`: the environment and the YAML file named by GATEWAY_BREAKER_CONFIG,
or `examples/config.yaml` when that variable is unset. Every service `name` with `prefix`
(default `/name`) and `upstream` gets `{prefix}/{rest}` proxied to `{upstream}/{rest}`.

- Upstream connect error -> 502, upstream timeout -> 504 (both count as failures).
- An open breaker -> 503 with Retry-After (answered by the middleware; the upstream is not called).
- `GET /healthz` -> 200 `{"status": "ok"}`; a path under no service -> 404.
- A request no upstream should see (a `.` or `..` segment, an encoded `/` or `\\`, malformed
  percent-encoding, control characters, a request target over 8 KiB) -> 400 or 414 from the
  gateway itself, before any breaker sees it: it is evidence about the client, not the upstream.
- A client that leaves (mid-upload, mid-response) gets no answer and its call counts for nothing.
- Proxied responses carry the gateway's own `Date` and `Server` (the upstream's are dropped, as
  nginx does) and `Via: 1.1 gateway-breaker`; requests to the upstream carry `Via` too.
- Run under a root path (`uvicorn --root-path /api`, or mounted under `/api`), the path below it
  is routed and forwarded.
- The upstream host `demo-upstream` is served in-process by `examples.upstream`, so the default
  config works with no other process. Any other upstream is reached over the network.

Environment: `LOG_LEVEL` (default `info`) sets the level of the `gateway_breaker` log lines,
printed to stdout; `UPSTREAM_CONNECT_TIMEOUT` (default 2) and `UPSTREAM_TIMEOUT` (default 30)
bound, in seconds, connecting to an upstream and each read or write of one;
`UPSTREAM_MAX_CONNECTIONS` (default 200) caps the connections open to the upstreams;
`UPSTREAM_TRANSPORT` picks the HTTP client engine (examples/transport.py): `aiohttp` (the default
when aiohttp is installed, as with the `example` extra) or `httpx` (httpx's own; `httpx-aiohttp`
too, for the benchmark only).

A proxied request passes RequestGuard, the breaker middleware and ProxyDispatch, which hands it
to UpstreamProxy directly: FastAPI's router and exception layers are for `/healthz` and any route
you add (docs/gateway-transport.md has what each layer costs).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote_to_bytes

import httpx
from fastapi import FastAPI
from starlette.requests import ClientDisconnect
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from examples import upstream as demo_upstream
from examples.httpx_transport import HttpxTransport
from examples.transport import AiohttpTransport, UpstreamResponse, UpstreamTransport
from gateway_breaker import CircuitBreakerMiddleware, Config, ConfigError, RouteTable
from gateway_breaker.config import CONFIG_PATH_ENV

DEFAULT_CONFIG = Path(__file__).with_name("config.yaml")
DEMO_UPSTREAM = "http://demo-upstream"
LOGGERS = ("gateway_breaker", "examples")
# Hop-by-hop headers (RFC 9110 7.6.1) belong to one connection and are never forwarded; `host`
# is the upstream's own.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
    }
)
# Sent by the gateway's own server (uvicorn) on every response: the upstream's are dropped so
# that a proxied response carries exactly one of each, like nginx's proxy does. Also dropped:
# `Service-Worker-Allowed`, with which an upstream's script could claim every path of the
# gateway's origin (the admin dashboard's too) for its service worker.
SERVER_OWN = frozenset({b"date", b"server", b"service-worker-allowed"})
# What a response without a Connection header loses (the usual case: one set, made once).
_RESPONSE_DROP = HOP_BY_HOP | SERVER_OWN
# RFC 9110 7.6.3: the protocol this hop received, and a pseudonym for this intermediary.
VIA = b"1.1 gateway-breaker"
VIA_TEXT = VIA.decode()
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
_METHODS = frozenset(METHODS)
_BODY_HEADERS = (b"content-length", b"transfer-encoding")
# `httpx-aiohttp` is there to be measured (benchmarks/e2e_load.py), not to be run: version 0.2
# maps a refused connection to httpx.ConnectTimeout, so a dead upstream would answer 504.
TRANSPORTS = ("aiohttp", "httpx", "httpx-aiohttp")
# Characters left as they are when the decoded path is re-encoded for the upstream.
PATH_SAFE = "/:@!$&'()*+,;=-._~"
# A path of only these needs no re-encoding (the usual case: quote() is then skipped).
_PATH_PLAIN = re.compile(r"[A-Za-z0-9/:@!$&'()*+,;=\-._~]*")
# Path plus query. Servers' own limits differ (h11 refuses at 16 KiB of head, httptools has
# none); the gateway's is the same whichever runs it.
MAX_TARGET_BYTES = 8 * 1024
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_ENCODED_SEPARATOR = re.compile(rb"%(2[fF]|5[cC])")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Young-generation collection threshold while serving (CPython's default is 700; see lifespan).
YOUNG_GC_THRESHOLD = 10_000

logger = logging.getLogger("examples.gateway")


def configure_logging(level: str | None = None) -> None:
    """Print the package's log lines to stdout at `level` (default: LOG_LEVEL, else info)."""
    name = (level or os.environ.get("LOG_LEVEL") or "info").strip().upper()
    name = {"WARN": "WARNING", "FATAL": "CRITICAL"}.get(name, name)
    value = logging.getLevelNamesMapping().get(name)
    if value is None:
        raise SystemExit(f"LOG_LEVEL: unknown level {name.lower()!r} (debug, info, warning, error)")
    formatter = logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    for logger_name in LOGGERS:
        log = logging.getLogger(logger_name)
        log.setLevel(value)
        log.propagate = False
        if not any(getattr(h, "example_gateway", False) for h in log.handlers):
            handler = logging.StreamHandler(sys.stdout)
            handler.setFormatter(formatter)
            handler.example_gateway = True  # type: ignore[attr-defined]
            log.addHandler(handler)


def load_config() -> Config:
    """`Config()`, with `examples/config.yaml` standing in when GATEWAY_BREAKER_CONFIG is unset."""
    if os.environ.get(CONFIG_PATH_ENV):
        return Config()
    return Config.from_yaml(DEFAULT_CONFIG)


def upstream_timeout() -> httpx.Timeout:
    """Explicit bounds on every upstream call, from UPSTREAM_CONNECT_TIMEOUT / UPSTREAM_TIMEOUT."""
    connect = _seconds("UPSTREAM_CONNECT_TIMEOUT", 2.0)
    io = _seconds("UPSTREAM_TIMEOUT", 30.0)
    return httpx.Timeout(connect=connect, read=io, write=io, pool=connect)


def upstream_limits() -> httpx.Limits:
    """At most UPSTREAM_MAX_CONNECTIONS (default 200) open to the upstreams at once; a request
    waits for a free one up to the connect timeout. Idle ones close after 5 s."""
    raw = os.environ.get("UPSTREAM_MAX_CONNECTIONS") or "200"
    try:
        count = int(raw)
    except ValueError:
        count = 0
    if not 1 <= count <= 100_000:
        raise ConfigError(f"UPSTREAM_MAX_CONNECTIONS: an integer in 1-100000, got {raw!r}")
    return httpx.Limits(max_connections=count, max_keepalive_connections=min(count, 50))


def upstream_transport() -> str:
    """UPSTREAM_TRANSPORT, else `aiohttp` when it is installed, else `httpx`."""
    raw = os.environ.get("UPSTREAM_TRANSPORT", "").strip().lower()
    if not raw:
        try:
            import aiohttp  # noqa: F401
        except ImportError:
            return "httpx"
        return "aiohttp"
    if raw not in TRANSPORTS:
        raise ConfigError(f"UPSTREAM_TRANSPORT: one of {', '.join(TRANSPORTS)}, got {raw!r}")
    return raw


def _seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not 0 < value <= 3600:
        raise ConfigError(f"{name}: must be seconds in (0, 3600], got {raw!r}")
    return value


def route_path(scope: Scope) -> str:
    """The decoded path below the app's root path (ASGI: `path` includes `root_path`)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :] or "/"
    return path


def refusal(scope: Scope) -> tuple[int, str, str] | None:
    """Why the gateway answers this request itself (status, title, detail), or None.

    Checked before any breaker: a path that could mean one service to the router and another to
    the upstream (dot segments, encoded separators), or that the server decoded lossily, is
    refused rather than normalised, so that the path a breaker is charged for is always the
    path its upstream receives.
    """
    raw: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
    query: bytes = scope.get("query_string", b"")
    if len(raw) + len(query) > MAX_TARGET_BYTES:
        return 414, "URI Too Long", f"the request target is over {MAX_TARGET_BYTES} bytes"
    escaped = b"%" in raw  # the usual path has none: the escape checks cannot fail then
    if escaped and _BAD_ESCAPE.search(raw):
        return 400, "Bad Request", "malformed percent-encoding in the path"
    try:
        (unquote_to_bytes(raw) if escaped else raw).decode("utf-8")
    except UnicodeDecodeError:
        return 400, "Bad Request", "the path is not UTF-8 once percent-decoded"
    if escaped and _ENCODED_SEPARATOR.search(raw):
        return 400, "Bad Request", "an encoded '/' or '\\' in the path"
    path: str = scope["path"]
    if "\\" in path or _CONTROL.search(path):
        return 400, "Bad Request", "a backslash or a control character in the path"
    # Every segment follows a '/': a '.' or '..' one needs "/." somewhere.
    if "/." in path and any(segment in (".", "..") for segment in path.split("/")):
        return 400, "Bad Request", "a '.' or '..' segment in the path"
    # `..;x` is `..` to an upstream that reads path parameters (Tomcat, Spring): refused too.
    if ";" in path and any(s.partition(";")[0] in (".", "..") for s in path.split("/")):
        return 400, "Bad Request", "a '.' or '..' segment (with parameters) in the path"
    return None


class RequestGuard:
    """Pure ASGI, outside the breakers: answers the requests no upstream should see."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # A plain function that hands back the next layer's awaitable: no coroutine of its own.
        if scope["type"] == "http" and (refused := refusal(scope)) is not None:
            status, title, detail = refused
            return _send_problem(send, status, title, detail)
        return self.app(scope, receive, send)


class _RequestBody:
    """The client's body as an async iterator, noting whether the client left while sending it."""

    def __init__(self, receive: Receive) -> None:
        self.receive = receive
        self.disconnected = False
        self.complete = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while not self.complete:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self.disconnected = True
                raise ClientDisconnect()
            self.complete = not message.get("more_body", False)
            if chunk := message.get("body", b""):
                yield chunk


def _watch_disconnect(receive: Receive) -> asyncio.Future[None]:
    """A task that ends when the client has gone (the request body must be read already)."""

    async def wait() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    return asyncio.ensure_future(wait())


class UpstreamProxy:
    """Pure ASGI: forwards requests under a service's prefix to its upstream, one shared client."""

    def __init__(
        self, config: Config, timeout: httpx.Timeout, transport: str | None = None
    ) -> None:
        services = config.circuit_breaker.services
        missing = [name for name, s in services.items() if s.upstream is None]
        if missing:
            raise ConfigError(
                "\n  ".join(
                    ["invalid configuration for the example gateway:"]
                    + [f"circuit_breaker.services.{name}.upstream: needed" for name in missing]
                )
            )
        routes = config.circuit_breaker.routes()
        self.routes = RouteTable(routes)
        self.prefixes = {service: prefix for prefix, service in routes.items()}
        self.upstreams = {name: str(s.upstream).rstrip("/") for name, s in services.items()}
        self.timeout = timeout
        self.transport = transport or upstream_transport()
        self.limits = upstream_limits()
        self.network: UpstreamTransport | None = None
        self.by_service: dict[str, UpstreamTransport] = {}

    def open_transports(self) -> None:
        """The network transport and the in-process demo upstream, picked per service once.

        The proxy speaks the narrow interface of examples/transport.py (method, URL, headers,
        body in; status, raw headers, body chunks out): no client-side request or response
        objects, and no `httpx.AsyncClient`, whose per-request work (cookie persistence, auth
        and redirect flows, URL merging) is what a proxy must not do.
        """
        if self.transport == "aiohttp":
            self.network = AiohttpTransport(limits=self.limits, timeout=self.timeout)
        elif self.transport == "httpx-aiohttp":
            import httpx_aiohttp

            engine: httpx.AsyncBaseTransport = httpx_aiohttp.AiohttpTransport(
                limits=self.limits, trust_env=False
            )
            self.network = HttpxTransport(engine, self.timeout)
        else:
            engine = httpx.AsyncHTTPTransport(limits=self.limits, trust_env=False)
            self.network = HttpxTransport(engine, self.timeout)
        demo = HttpxTransport(httpx.ASGITransport(app=demo_upstream.app), self.timeout)
        self.by_service = {
            name: demo if httpx.URL(url).host == httpx.URL(DEMO_UPSTREAM).host else self.network
            for name, url in self.upstreams.items()
        }

    async def aclose(self) -> None:
        network, self.network = self.network, None
        self.by_service = {}
        if network is not None:
            await network.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = route_path(scope)
        service = self.routes.match(path)
        if service is None:
            await _send_problem(send, 404, "Not Found", f"no service is configured for {path}")
            return
        await self.forward(service, path, scope, receive, send)

    async def forward(
        self, service: str, path: str, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """Forwards the request for `path` (below the root path) to `service`'s upstream."""
        if not self.by_service:  # run without lifespan events: open on first use
            logger.warning("No lifespan startup ran; opening the upstream transport on first use")
            self.open_transports()
        prefix = self.prefixes[service]
        rest = path if prefix == "/" else path[len(prefix) :]
        url = self.upstreams[service] + (
            rest if _PATH_PLAIN.fullmatch(rest) else quote(rest, safe=PATH_SAFE)
        )
        query: bytes = scope["query_string"]
        if query:
            url += "?" + query.decode("latin-1")
        headers, has_body = _forward_headers(scope)
        body = _RequestBody(receive) if has_body else None
        try:
            upstream = await self.by_service[service].send(scope["method"], url, headers, body)
        except Exception as exc:
            if body is not None and body.disconnected:
                _log_gone(service, "while sending its body")
                return  # no response: the middleware releases the permit, records nothing
            if isinstance(exc, httpx.TimeoutException):
                logger.info("Upstream timed out (service=%s, url=%s, error=%r)", service, url, exc)
                detail = f"upstream of {service} timed out"
                await _send_problem(send, 504, "Gateway Timeout", detail, service)
                return
            if isinstance(exc, httpx.TransportError):
                logger.info(
                    "Upstream unreachable (service=%s, url=%s, error=%r)", service, url, exc
                )
                detail = f"upstream of {service} is unreachable"
                await _send_problem(send, 502, "Bad Gateway", detail, service)
                return
            raise
        try:
            await self._relay(upstream, service, body, receive, send)
        finally:
            await upstream.aclose()

    async def _relay(
        self,
        upstream: UpstreamResponse,
        service: str,
        body: _RequestBody | None,
        receive: Receive,
        send: Send,
    ) -> None:
        start: Message = {"type": "http.response.start", "status": upstream.status}
        start["headers"] = _response_headers(upstream.headers)
        # A response in one piece (the usual small answer) is sent in one message. A longer one
        # is relayed chunk by chunk while watching receive(), the only way the server tells of
        # a client that left, so that a response the client never gets is never completed.
        first = await upstream.read_chunk()
        if not first or upstream.content_length == len(first):
            await send(start)
            await send({"type": "http.response.body", "body": first, "more_body": False})
            return
        gone = None if body is not None and not body.complete else _watch_disconnect(receive)
        try:
            await send(start)
            await send({"type": "http.response.body", "body": first, "more_body": True})
            chunk = await upstream.read_chunk()
            while chunk:
                if gone is not None and gone.done():
                    _log_gone(service, "before the whole response")
                    return
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                chunk = await upstream.read_chunk()
            if gone is not None and gone.done():
                _log_gone(service, "before the whole response")
                return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # ASGI 2.4 servers raise on a send to a closed connection
            _log_gone(service, "before the whole response")
        finally:
            if gone is not None:
                gone.cancel()


class ProxyDispatch:
    """Pure ASGI, inside the breakers: sends a request under a service's prefix straight to the
    proxy, past the framework's routing and exception layers (the proxy answers its own
    errors); everything else (`/healthz`, the app's own routes, 404s, 405s) goes on to the app.
    """

    def __init__(self, app: ASGIApp, proxy: UpstreamProxy, own_paths: frozenset[str]) -> None:
        self.app = app
        self.proxy = proxy
        self.own_paths = own_paths

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if scope["type"] == "http" and scope["method"] in _METHODS:
            path = route_path(scope)
            if path not in self.own_paths and (service := self.proxy.routes.match(path)):
                return self.proxy.forward(service, path, scope, receive, send)
        return self.app(scope, receive, send)


def _log_gone(service: str, when: str) -> None:
    logger.debug("Client disconnected %s (service=%s); the call counts for nothing", when, service)


def _connection_tokens(values: list[bytes]) -> frozenset[bytes]:
    """Hop-by-hop headers plus any the Connection header names."""
    named = {token.strip().lower() for v in values for token in v.split(b",")}
    return HOP_BY_HOP | named


def _response_headers(raw: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The upstream's end-to-end headers, less `Date` and `Server` (uvicorn sends its own),
    plus Via."""
    connection = [v for k, v in raw if k.lower() == b"connection"]
    hop = _connection_tokens(connection) | SERVER_OWN if connection else _RESPONSE_DROP
    headers = [(k, v) for k, v in raw if k.lower() not in hop]
    headers.append((b"via", VIA))
    return headers


def _forward_headers(scope: Scope) -> tuple[list[tuple[str, str]], bool]:
    """The client's end-to-end headers plus X-Forwarded-* and Via; whether a body follows."""
    raw: list[tuple[bytes, bytes]] = scope["headers"]
    connection = [v for k, v in raw if k == b"connection"]
    hop = _connection_tokens(connection) if connection else HOP_BY_HOP
    headers: list[tuple[str, str]] = []
    forwarded_for: list[str] = []
    has_body = proto = host = False
    host_value: str | None = None
    via: list[str] = []
    for name, value in raw:
        if name in _BODY_HEADERS:
            has_body = True
        if name == b"x-forwarded-for":
            forwarded_for.append(value.decode("latin-1"))
        elif name == b"via":
            via.append(value.decode("latin-1"))
        elif name not in hop:
            proto = proto or name == b"x-forwarded-proto"
            host = host or name == b"x-forwarded-host"
            headers.append((name.decode("latin-1"), value.decode("latin-1")))
        elif name == b"host":
            host_value = value.decode("latin-1")
    client = scope.get("client")
    if client:
        forwarded_for.append(client[0])
    if forwarded_for:
        headers.append(("x-forwarded-for", ", ".join(forwarded_for)))
    if not proto:
        headers.append(("x-forwarded-proto", scope.get("scheme", "http")))
    if not host and host_value is not None:
        headers.append(("x-forwarded-host", host_value))
    headers.append(("via", ", ".join([*via, VIA_TEXT]) if via else VIA_TEXT))
    return headers, has_body


async def _send_problem(
    send: Send, status: int, title: str, detail: str, service: str | None = None
) -> None:
    doc: dict[str, Any] = {"type": "about:blank", "title": title, "status": status}
    doc["detail"] = detail
    if service is not None:
        doc["service"] = service
    body = json.dumps(doc, separators=(",", ":")).encode()
    start: Message = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/problem+json"),
            (b"content-length", str(len(body)).encode()),
        ],
    }
    await send(start)
    await send({"type": "http.response.body", "body": body, "more_body": False})


class GatewayApp(FastAPI):
    """FastAPI, with the application's middleware outside the framework's error layer.

    Starlette puts `ServerErrorMiddleware` (which wraps `send` for every request) outermost and
    the application's middleware inside it. Here the order is RequestGuard, the breakers,
    ProxyDispatch, then the framework's stack: a proxied request meets no framework layer at
    all. An exception that escapes the proxy is answered 500 by the server (uvicorn), as the
    error layer would, and the breaker has seen it first either way.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # FastAPI's telemetry turned off by name (as create_app does): its layer can be skipped.
        telemetry = kwargs.get("telemetry")
        self.untraced = isinstance(telemetry, dict) and not any(telemetry.values())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # FastAPI's and Starlette's own `__call__` are two coroutines around the stack; with no
        # root path to set and FastAPI's telemetry off (as create_app builds it), a request
        # goes to the stack from here.
        stack = self.middleware_stack
        if stack is not None and scope["type"] == "http" and not self.root_path and self.untraced:
            scope["app"] = self
            await stack(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    def build_middleware_stack(self) -> ASGIApp:
        own, self.user_middleware = self.user_middleware, []
        try:
            app = super().build_middleware_stack()
        finally:
            self.user_middleware = own
        for cls, args, kwargs in reversed(own):
            app = cls(app, *args, **kwargs)
        return app


def create_app(
    config: Config | None = None,
    *,
    timeout: httpx.Timeout | None = None,
    transport: str | None = None,
) -> GatewayApp:
    """The gateway for `config` (default: `load_config()`)."""
    config = config if config is not None else load_config()
    proxy = UpstreamProxy(config, timeout if timeout is not None else upstream_timeout(), transport)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        proxy.open_transports()
        # What start-up made (modules, the framework, config models) lives as long as the
        # process: out of the collector's sight, a full collection no longer walks all of it.
        gc.freeze()
        # Each request in flight holds about 90 objects the collector tracks (the server's, the
        # gateway's and the HTTP client's coroutines and their state): past a few concurrent
        # requests that is more than CPython's young-generation threshold (700), and young
        # collections then run every few dozen requests, scanning a thousand live objects to
        # free none. The threshold is set for the gateway's process while it serves.
        thresholds = gc.get_threshold()
        gc.set_threshold(YOUNG_GC_THRESHOLD, *thresholds[1:])
        try:
            yield
        finally:
            gc.set_threshold(*thresholds)
            await proxy.aclose()

    app = GatewayApp(
        title="gateway-breaker example gateway",
        lifespan=lifespan,
        # FastAPI's own OpenTelemetry hooks look for a provider on every request; the gateway
        # reports through gateway_breaker's metrics instead. Turn them back on to trace.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.proxy = proxy
    # Added first: innermost. Outermost first, a proxied request meets RequestGuard, then the
    # breakers, then ProxyDispatch, which hands it to the proxy (no router, no FastAPI layers).
    app.add_middleware(ProxyDispatch, proxy=proxy, own_paths=frozenset({"/healthz"}))
    app.add_middleware(CircuitBreakerMiddleware, config=config)
    app.add_middleware(RequestGuard)  # added last: outermost, before any breaker

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    # Whatever ProxyDispatch leaves (a path under no service, a method the proxy does not
    # forward) reaches the router: the proxy answers 404 for the paths, the router 405.
    app.router.routes.append(Route("/{path:path}", proxy, methods=METHODS, include_in_schema=False))
    return app


def _main_app() -> FastAPI:
    configure_logging()
    try:
        return create_app()
    except ConfigError as exc:
        # A clean one-screen message (naming the field or file) and a non-zero exit.
        raise SystemExit(f"examples.gateway: {exc}") from None


app = _main_app()
