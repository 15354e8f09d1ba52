"""The floor of a Python proxy: a minimal ASGI reverse proxy, no framework, no breaker.

`benchmarks/e2e_load.py` runs it as the contender `floor`, under the same server as the example
gateway (uvicorn + uvloop + httptools) and on the same HTTP client engine (one shared
`aiohttp.ClientSession`), so that gateway / floor says what the gateway's framework, header
handling and breaker cost beyond the proxying every Python proxy on this stack must do.

What it does, and no more: forwards the method, the path and query unchanged to FLOOR_UPSTREAM
(e.g. `http://127.0.0.1:9001`), the client's headers but the hop-by-hop ones and `Host`, and a
request body read whole; answers with the upstream's status and headers (hop-by-hop, `Date` and
`Server` dropped: uvicorn writes its own) and relays the body chunk by chunk (an answer that
came in one piece in one message). No cookie jar, no
decompression, no redirects, no added headers. A failed upstream call answers 502. Its garbage
collector is set as the gateway's is (frozen start-up objects, the same young threshold).

Run:  FLOOR_UPSTREAM=http://127.0.0.1:9001 uvicorn floor_proxy:app --app-dir benchmarks \
          --loop uvloop --http httptools
"""

from __future__ import annotations

import gc
import os
from typing import Any

import aiohttp
from yarl import URL

DROP_REQUEST = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade", b"host"}
    | {b"transfer-encoding", b"proxy-authorization"}
)
DROP_RESPONSE = frozenset(
    {b"connection", b"keep-alive", b"transfer-encoding", b"trailer", b"upgrade"}
    | {b"proxy-authenticate", b"date", b"server"}
)
YOUNG_GC_THRESHOLD = 10_000  # as examples.gateway's
SKIP_AUTO_HEADERS = frozenset({"Accept", "Accept-Encoding", "User-Agent", "Content-Type"})


class FloorProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=200, limit_per_host=0),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=SKIP_AUTO_HEADERS,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=2, sock_read=30),
        )
        return self.session

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    # The example gateway's runtime settings (examples/gateway.py, lifespan):
                    # like with like, the floor's collector runs as the gateway's does.
                    gc.freeze()
                    gc.set_threshold(YOUNG_GC_THRESHOLD, *gc.get_threshold()[1:])
                    await send({"type": "lifespan.startup.complete"})
                else:
                    if self.session is not None:
                        await self.session.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        session = self.session or self._open()
        target = scope.get("raw_path") or scope["path"].encode()
        if scope["query_string"]:
            target += b"?" + scope["query_string"]
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in scope["headers"]
            if k not in DROP_REQUEST
        ]
        body = b""
        more = scope["method"] not in ("GET", "HEAD")
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
        try:
            response = await session.request(
                scope["method"],
                URL(self.upstream + target.decode("latin-1"), encoded=True),
                headers=headers,
                data=body or None,
                allow_redirects=False,
            )
        except (aiohttp.ClientError, TimeoutError):
            await send({"type": "http.response.start", "status": 502, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status,
                    "headers": [
                        (k, v) for k, v in response.raw_headers if k.lower() not in DROP_RESPONSE
                    ],
                }
            )
            chunk = await response.content.readany()
            if len(chunk) == response.content_length:  # the usual small answer: one message
                await send({"type": "http.response.body", "body": chunk})
                return
            while chunk:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                chunk = await response.content.readany()
            await send({"type": "http.response.body", "body": b""})
        finally:
            response.release()


app = FloorProxy(os.environ.get("FLOOR_UPSTREAM", "http://127.0.0.1:9001"))
