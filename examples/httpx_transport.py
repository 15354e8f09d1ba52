"""Any httpx transport behind the proxy's upstream interface (examples/transport.py).

Serves `UPSTREAM_TRANSPORT=httpx` (httpx's own transport, httpcore), `httpx-aiohttp` (measured
by benchmarks/e2e_load.py only) and the in-process demo upstream (`httpx.ASGITransport`). It
builds the `httpx.Request` each call needs and hands back the streamed `httpx.Response`'s
status, raw headers and body chunks; the transport's own errors (httpx.TransportError) pass
through as they are.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator

import httpx

from examples.transport import Headers, UpstreamResponse


class HttpxTransport:
    def __init__(self, transport: httpx.AsyncBaseTransport, timeout: httpx.Timeout) -> None:
        self.transport = transport
        self.extensions = {"timeout": timeout.as_dict()}

    async def send(
        self, method: str, url: str, headers: Headers, body: AsyncIterable[bytes] | None
    ) -> UpstreamResponse:
        request = httpx.Request(
            method,
            url,
            headers=list(headers),
            content=None if body is None else _stream(body),
            extensions=self.extensions,
        )
        return _HttpxResponse(await self.transport.handle_async_request(request))

    async def aclose(self) -> None:
        await self.transport.aclose()


async def _stream(body: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    async for chunk in body:
        yield chunk


class _HttpxResponse:
    __slots__ = ("_chunks", "_response", "content_length", "headers", "status")

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status = response.status_code
        self.headers = response.headers.raw
        length = response.headers.get("content-length")
        self.content_length = int(length) if length and length.isdigit() else None
        # The transport's own stream: Response.aiter_raw() adds re-chunking a relay has no use for.
        stream = response.stream
        assert isinstance(stream, httpx.AsyncByteStream)
        self._chunks = aiter(stream)

    async def read_chunk(self) -> bytes:
        async for chunk in self._chunks:
            if chunk:
                return chunk
        return b""

    async def aclose(self) -> None:
        await self._response.aclose()
