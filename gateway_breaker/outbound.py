"""BreakerTransport: the fleet's breakers around the calls an httpx client makes.

An `httpx.AsyncBaseTransport` around another one. Each request is admitted by the manager
exactly as the middleware admits one (`manager.admit`: fleet-wide probe slots, the recovery
ramp, manual modes), so a breaker opened by any instance, gateway or client, rejects here too.

The outcome is recorded as soon as the response's status is known, before its body is read:
a streamed body stays streamed, a long download or a server-sent event stream never holds a
half-open probe slot, and the slow-call rule measures the time to the response's headers.
An error while reading the body afterwards is the caller's to see; it is not counted again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, TypeAlias
from urllib.parse import urlsplit

import httpx

from gateway_breaker.errors import CircuitOpenError

if TYPE_CHECKING:
    from gateway_breaker.manager import CircuitBreakerManager

ServiceRoute: TypeAlias = Callable[[httpx.Request], str | None]
"""Picks the service of a request; None leaves the request unguarded."""

_DEFAULT_PORTS = {"http": 80, "https": 443}


class CircuitOpenTransportError(CircuitOpenError, httpx.TransportError):
    """The service's breaker rejected the request: a `CircuitOpenError` (`.service`,
    `.retry_after` seconds) that httpx callers can also catch as an `httpx.TransportError`."""

    def __init__(self, service: str, retry_after: float, request: httpx.Request) -> None:
        CircuitOpenError.__init__(self, service, retry_after)
        self._request = request  # what httpx.RequestError.request returns


class BreakerTransport(httpx.AsyncBaseTransport):
    """Guards each request with the breaker of its service.

    `service` is a service name, or a callable `(httpx.Request) -> str | None` (None: the
    request is not guarded); `route_by_origin(config)` builds one from the configured
    upstreams. Failures: transport errors (connect, read, timeouts) and statuses in the
    policy's `failure_status_codes`; a cancelled request counts for nothing and gives back
    any probe slot. While the breaker rejects, raises `CircuitOpenTransportError` (a
    `CircuitOpenError` and an `httpx.TransportError`) without sending anything.
    """

    def __init__(
        self,
        manager: CircuitBreakerManager,
        *,
        service: str | ServiceRoute,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not isinstance(service, str) and not callable(service):
            raise TypeError("service: expected a service name or a callable on the request")
        self.manager = manager
        self.service = service
        self.transport = transport if transport is not None else httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        service = self.service if isinstance(self.service, str) else self.service(request)
        if service is None:
            return await self.transport.handle_async_request(request)
        try:
            breaker, permit = await self.manager.admit(service)
        except CircuitOpenError as exc:
            raise CircuitOpenTransportError(exc.service, exc.retry_after, request) from None
        try:
            response = await self.transport.handle_async_request(request)
        except Exception:
            breaker.record(permit, failed=True)  # connect, read, timeouts, ...
            raise
        except BaseException:
            breaker.release(permit)  # cancelled or interrupted: nothing, the slot goes back
            raise
        breaker.record(permit, response.status_code in breaker.failure_codes)
        return response

    async def aclose(self) -> None:
        await self.transport.aclose()


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or _DEFAULT_PORTS.get(scheme)


def route_by_origin(manager: CircuitBreakerManager) -> ServiceRoute:
    """A `service` callable for `BreakerTransport`: a request belongs to the configured
    service whose `upstream` has the request's origin (scheme, host, port); when several
    share it, the one whose upstream path is the longest segment prefix of the request's
    path. A request no service matches is not guarded."""
    services = manager.config.circuit_breaker.services
    return route_upstreams(
        (name, policy.upstream) for name, policy in services.items() if policy.upstream
    )


def route_upstreams(upstreams: Iterable[tuple[str, str]]) -> ServiceRoute:
    """`route_by_origin` over `(service, upstream URL)` pairs."""
    table: dict[tuple[str, str, int | None], list[tuple[str, str]]] = {}
    for service, url in upstreams:
        path = urlsplit(url).path.rstrip("/")
        table.setdefault(_origin(url), []).append((path, service))
    for candidates in table.values():
        candidates.sort(key=lambda entry: len(entry[0]), reverse=True)  # longest path first

    def route(request: httpx.Request) -> str | None:
        url = request.url
        scheme = url.scheme
        candidates = table.get((scheme, url.host, url.port or _DEFAULT_PORTS.get(scheme)))
        if candidates is None:
            return None
        path = url.path
        for prefix, service in candidates:
            if path.startswith(prefix) and path[len(prefix) : len(prefix) + 1] in ("", "/"):
                return service
        return None

    return route
