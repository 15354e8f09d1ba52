"""An httpx transport over aiohttp's client: httpx's API, aiohttp's faster HTTP/1.1 engine.

The example gateway keeps `httpx.AsyncClient` as its client API (mounts, timeouts, limits,
streaming) and plugs this transport in underneath; `benchmarks/e2e_load.py` measures it against
httpx's own transport and `httpx-aiohttp` (see docs/e2e-and-restore.md for the figures and for
why this one).

What it keeps of httpx's contract:
- Timeouts: `connect` bounds opening a connection, `pool` waiting for a free one (aiohttp counts
  both in one budget, their sum), `read` each wait for response bytes. A connect timeout raises
  `httpx.ConnectTimeout`, a read timeout `httpx.ReadTimeout`; a refused or unresolvable connection
  `httpx.ConnectError`; a connection the upstream drops `httpx.RemoteProtocolError` or
  `httpx.ReadError`. aiohttp has no write timeout of its own: a stalled upload is bounded by
  the upstream's read timeout as it waits for the answer.
- Limits: `max_connections` caps open connections (a request waits for one, up to `pool`);
  `keepalive_expiry` closes idle ones. aiohttp keeps every released connection up to that cap,
  so `max_keepalive_connections` has no separate effect.
- Bodies stream both ways, unmodified: no decompression, no added `Content-Type`, no cookie jar
  (a gateway must never carry one client's cookies to the next request), no redirects, no
  re-quoting of the URL httpx built.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx
from yarl import URL

# aiohttp adds these when a request lacks them; a proxy forwards what the client sent, no more.
_SKIP_AUTO_HEADERS = frozenset({"Accept", "Accept-Encoding", "User-Agent", "Content-Type"})


class AiohttpTransport(httpx.AsyncBaseTransport):
    """Sends httpx requests through one `aiohttp.ClientSession`, made in the running loop."""

    def __init__(self, *, limits: httpx.Limits | None = None) -> None:
        self.limits = limits or httpx.Limits()
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[tuple[float | None, ...], aiohttp.ClientTimeout] = {}

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
            timeout=aiohttp.ClientTimeout(total=None),
        )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._session or self._open()
        timeout: dict[str, float | None] = request.extensions.get("timeout", {})
        headers = [(k, v) for k, v in request.headers.raw if k.lower() != b"transfer-encoding"]
        data: Any = None
        if isinstance(request.stream, httpx.ByteStream):
            data = request.content or None
        elif isinstance(request.stream, httpx.AsyncByteStream):
            # Streamed: aiohttp sends it chunked unless the headers carry a Content-Length.
            data = _body(request.stream)
        else:
            raise TypeError("AiohttpTransport needs an async request body")
        try:
            response = await session.request(
                request.method,
                URL(str(request.url), encoded=True),
                headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers],
                data=data,
                allow_redirects=False,
                timeout=self._timeout(timeout),
            )
        except Exception as exc:
            raise _mapped(exc, request) from exc
        return httpx.Response(
            status_code=response.status,
            headers=response.raw_headers,
            stream=_ResponseStream(response, request),
            request=request,
            extensions={"http_version": b"HTTP/1.1"},
        )

    def _timeout(self, timeout: dict[str, float | None]) -> aiohttp.ClientTimeout:
        """aiohttp's timeouts for httpx's, made once per distinct set (usually one)."""
        key = (timeout.get("connect"), timeout.get("pool"), timeout.get("read"))
        made = self._timeouts.get(key)
        if made is None:
            connect, pool, read = key
            made = self._timeouts[key] = aiohttp.ClientTimeout(
                total=None,
                connect=None if connect is None or pool is None else connect + pool,
                sock_connect=connect,
                sock_read=read,
            )
        return made

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


async def _body(stream: httpx.AsyncByteStream) -> AsyncIterator[bytes]:
    async for chunk in stream:
        yield chunk


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        content = self._response.content
        while True:
            try:
                chunk = await content.readany()
            except Exception as exc:
                raise _mapped(exc, self._request) from exc
            if not chunk:
                return
            yield chunk

    async def aclose(self) -> None:
        self._response.release()


def _mapped(exc: Exception, request: httpx.Request) -> Exception:
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
    return kind(str(exc) or type(exc).__name__, request=request)
