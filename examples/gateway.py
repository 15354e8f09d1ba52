"""The example gateway: proxies each configured service, guarded by its circuit breaker.

Run it from the repository root with `uvicorn examples.gateway:app`. Settings come from
`gateway_breaker.Config()`: the environment and the YAML file named by GATEWAY_BREAKER_CONFIG,
or `examples/config.yaml` when that variable is unset. Every service `name` with `prefix`
(default `/name`) and `upstream` gets `{prefix}/{rest}` proxied to `{upstream}/{rest}`.

- Upstream connect error -> 502, upstream timeout -> 504 (both count as failures).
- An open breaker -> 503 with Retry-After (answered by the middleware; the upstream is not called).
- `GET /healthz` -> 200 `{"status": "ok"}`; a path under no service -> 404.
- The upstream host `demo-upstream` is served in-process by `examples.upstream`, so the default
  config works with no other process. Any other upstream is reached over the network.

Environment: `LOG_LEVEL` (default `info`) sets the level of the `gateway_breaker` log lines,
printed to stdout; `UPSTREAM_CONNECT_TIMEOUT` (default 2) and `UPSTREAM_TIMEOUT` (default 30)
bound, in seconds, connecting to an upstream and each read or write of one.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import quote

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect
from starlette.responses import Response, StreamingResponse

from examples import upstream as demo_upstream
from gateway_breaker import CircuitBreakerMiddleware, Config, ConfigError, RouteTable
from gateway_breaker.config import CONFIG_PATH_ENV

DEFAULT_CONFIG = Path(__file__).with_name("config.yaml")
DEMO_UPSTREAM = "http://demo-upstream"
LOGGERS = ("gateway_breaker", "examples")
# Hop-by-hop headers (RFC 9110 7.6.1) belong to one connection and are never forwarded; `host`
# is the upstream's own.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
# Characters left as they are when the decoded path is re-encoded for the upstream.
PATH_SAFE = "/:@!$&'()*+,;=-._~"

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


class UpstreamProxy:
    """Forwards requests under a service's prefix to its upstream with one shared client."""

    def __init__(self, config: Config, timeout: httpx.Timeout) -> None:
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
        self.upstreams = {name: str(s.upstream) for name, s in services.items()}
        self.timeout = timeout
        self.client: httpx.AsyncClient | None = None

    def open_client(self) -> httpx.AsyncClient:
        self.client = httpx.AsyncClient(
            timeout=self.timeout,
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
            follow_redirects=False,
            trust_env=False,  # a gateway never goes through proxies from the environment
            mounts={DEMO_UPSTREAM: httpx.ASGITransport(app=demo_upstream.app)},
        )
        return self.client

    async def aclose(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            await client.aclose()

    async def forward(self, request: Request) -> Response:
        path = request.url.path
        service = self.routes.match(path)
        if service is None:
            return _problem(404, "Not Found", f"no service is configured for {path}")
        client = self.client
        if client is None:  # run without lifespan events: make the client on first use
            logger.warning("No lifespan startup ran; opening the upstream client on first use")
            client = self.open_client()
        prefix = self.prefixes[service]
        rest = path if prefix == "/" else path[len(prefix) :]
        url = httpx.URL(self.upstreams[service] + quote(rest, safe=PATH_SAFE))
        query = request.scope.get("query_string", b"")
        if query:
            url = url.copy_with(query=query)
        has_body = "content-length" in request.headers or "transfer-encoding" in request.headers
        upstream_request = client.build_request(
            request.method,
            url,
            headers=_forward_headers(request),
            content=request.stream() if has_body else None,
        )
        try:
            upstream = await client.send(upstream_request, stream=True)
        except httpx.TimeoutException as exc:
            logger.info("Upstream timed out (service=%s, url=%s, error=%r)", service, url, exc)
            return _problem(504, "Gateway Timeout", f"upstream of {service} timed out", service)
        except httpx.TransportError as exc:
            logger.info("Upstream unreachable (service=%s, url=%s, error=%r)", service, url, exc)
            return _problem(502, "Bad Gateway", f"upstream of {service} is unreachable", service)
        except ClientDisconnect:
            return Response(status_code=499)  # nobody is listening; the breaker ignores it

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            finally:
                await upstream.aclose()

        response = StreamingResponse(
            body(), status_code=upstream.status_code, background=BackgroundTask(upstream.aclose)
        )
        hop = _connection_tokens(upstream.headers.get_list("connection"))
        response.raw_headers = [
            (name.encode("latin-1"), value.encode("latin-1"))
            for name, value in upstream.headers.multi_items()
            if name not in hop
        ]
        return response


def _connection_tokens(values: list[str]) -> frozenset[str]:
    """Hop-by-hop headers plus any the Connection header names."""
    named = {token.strip().lower() for value in values for token in value.split(",")}
    return HOP_BY_HOP | named


def _forward_headers(request: Request) -> list[tuple[str, str]]:
    hop = _connection_tokens(request.headers.getlist("connection"))
    headers = [(k, v) for k, v in request.headers.items() if k not in hop]
    client = request.client.host if request.client else None
    if client:
        prior = request.headers.get("x-forwarded-for")
        headers = [(k, v) for k, v in headers if k != "x-forwarded-for"]
        headers.append(("x-forwarded-for", f"{prior}, {client}" if prior else client))
    if "x-forwarded-proto" not in request.headers:
        headers.append(("x-forwarded-proto", request.url.scheme))
    if "host" in request.headers and "x-forwarded-host" not in request.headers:
        headers.append(("x-forwarded-host", request.headers["host"]))
    return headers


def _problem(status: int, title: str, detail: str, service: str | None = None) -> Response:
    doc: dict[str, object] = {"type": "about:blank", "title": title, "status": status}
    doc["detail"] = detail
    if service is not None:
        doc["service"] = service
    return JSONResponse(doc, status_code=status, media_type="application/problem+json")


def create_app(config: Config | None = None, *, timeout: httpx.Timeout | None = None) -> FastAPI:
    """The gateway for `config` (default: `load_config()`)."""
    config = config if config is not None else load_config()
    proxy = UpstreamProxy(config, timeout if timeout is not None else upstream_timeout())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        proxy.open_client()
        try:
            yield
        finally:
            await proxy.aclose()

    app = FastAPI(title="gateway-breaker example gateway", lifespan=lifespan)
    app.state.proxy = proxy
    app.add_middleware(CircuitBreakerMiddleware, config=config)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.api_route("/{path:path}", methods=METHODS, include_in_schema=False)
    async def proxy_route(request: Request) -> Response:
        return await proxy.forward(request)

    return app


def _main_app() -> FastAPI:
    configure_logging()
    try:
        return create_app()
    except ConfigError as exc:
        # A clean one-screen message (naming the field or file) and a non-zero exit.
        raise SystemExit(f"examples.gateway: {exc}") from None


app = _main_app()
