"""The proxy's upstream client: a small interface, and its default engine over aiohttp.

The example gateway forwards each request with `transport.send(method, url, headers, body)`
and relays the `UpstreamResponse` it gets back: status, raw headers, body chunk by chunk. The
interface is this narrow on purpose: a proxy needs no client-side request or response objects
(building an `httpx.Request` and `httpx.Response` per call, URL parsing included, was a fifth
of the gateway's CPU; see docs/gateway-transport.md). `examples/httpx_transport.py` puts any
httpx transport (httpx's own, the in-process demo upstream) behind the same interface.

What `AiohttpTransport` keeps of httpx's contract, so that both engines behave alike:
- Timeouts: `connect` bounds opening a connection, `pool` waiting for a free one (aiohttp counts
  both in one budget, their sum), `read` each wait for response bytes. A connect timeout raises
  `httpx.ConnectTimeout`, a read timeout `httpx.ReadTimeout`; a refused or unresolvable connection
  `httpx.ConnectError`; a connection the upstream drops `httpx.RemoteProtocolError` or
  `httpx.ReadError` (httpx's exception classes are the proxy's error vocabulary). aiohttp has no
  write timeout of its own: a stalled upload is bounded by the upstream's read timeout as it
  waits for the answer.
- Limits: `max_connections` caps open connections (a request waits for one, up to `pool`);
  `keepalive_expiry` closes idle ones. aiohttp keeps every released connection up to that cap,
  so `max_keepalive_connections` has no separate effect.
- Bodies stream both ways, unmodified: no decompression, no added `Content-Type`, no cookie jar
  (a gateway must never carry one client's cookies to the next request), no redirects, no
  re-quoting of the URL the proxy built.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, Sequence
from typing import Protocol

import aiohttp
import httpx
from yarl import URL

# aiohttp adds these when a request lacks them; a proxy forwards what the client sent, no more.
_SKIP_AUTO_HEADERS = frozenset({"Accept", "Accept-Encoding", "User-Agent", "Content-Type"})

Headers = Sequence[tuple[str, str]]


class UpstreamResponse(Protocol):
    """An upstream's answer, its body not read yet."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> Sequence[tuple[bytes, bytes]]:
        """As received: names in any case, repeats kept."""
        ...

    @property
    def content_length(self) -> int | None: ...

    async def read_chunk(self) -> bytes:
        """The next piece of the body as it arrives; b"" at the end."""
        ...

    async def aclose(self) -> None:
        """Give the connection back (to be reused when the body was read to its end)."""
        ...


class UpstreamTransport(Protocol):
    async def send(
        self, method: str, url: str, headers: Headers, body: AsyncIterable[bytes] | None
    ) -> UpstreamResponse:
        """Send one request (`url` already percent-encoded); raises httpx.TransportError."""
        ...

    async def aclose(self) -> None: ...


class AiohttpTransport:
    """Sends requests through one `aiohttp.ClientSession`, made in the running loop."""

    def __init__(self, *, limits: httpx.Limits, timeout: httpx.Timeout) -> None:
        self.limits = limits
        self._session: aiohttp.ClientSession | None = None
        connect, pool = timeout.connect, timeout.pool
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            connect=None if connect is None or pool is None else connect + pool,
            sock_connect=connect,
            sock_read=timeout.read,
        )

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=self.limits.max_connections or 0,
            limit_per_host=0,
            keepalive_timeout=self.limits.keepalive_expiry or 0,
            force_close=self.limits.keepalive_expiry == 0,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=_SKIP_AUTO_HEADERS,
            trust_env=False,
            timeout=self._timeout,
        )
        return self._session

    async def send(
        self, method: str, url: str, headers: Headers, body: AsyncIterable[bytes] | None
    ) -> UpstreamResponse:
        session = self._session or self._open()
        try:
            # A streamed body is sent chunked unless the headers carry a Content-Length.
            response = await session.request(
                method, URL(url, encoded=True), headers=headers, data=body, allow_redirects=False
            )
        except Exception as exc:
            raise _mapped(exc) from exc
        return _AiohttpResponse(response)

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


class _AiohttpResponse:
    __slots__ = ("_response", "content_length", "headers", "status")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.headers = response.raw_headers
        self.content_length = response.content_length

    async def read_chunk(self) -> bytes:
        try:
            return await self._response.content.readany()
        except Exception as exc:
            raise _mapped(exc) from exc

    async def aclose(self) -> None:
        self._response.release()


def _mapped(exc: Exception) -> Exception:
    """The httpx exception for an aiohttp one; anything else (a body iterator's own) as it is."""
    kind: type[httpx.TransportError]
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        kind = httpx.ConnectTimeout
    elif isinstance(exc, aiohttp.ServerTimeoutError | asyncio.TimeoutError):
        kind = httpx.ReadTimeout
    elif isinstance(exc, aiohttp.ClientConnectorError):
        kind = httpx.ConnectError
    elif isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientResponseError):
        kind = httpx.RemoteProtocolError
    elif isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ClientConnectionError):
        kind = httpx.ReadError
    elif isinstance(exc, aiohttp.InvalidURL):
        kind = httpx.UnsupportedProtocol
    elif isinstance(exc, aiohttp.ClientError):
        kind = httpx.TransportError
    else:
        return exc
    return kind(str(exc) or type(exc).__name__)
