"""A flaky demo upstream, httpbin-like and stateless, to try the example gateway against.

Run it alone with `uvicorn examples.upstream:app --port 9001`. Routes match on the end of the
path, so one instance serves every prefix a gateway forwards: with the upstream
`http://127.0.0.1:9001/discovery`, the gateway's `/discovery/status/500` arrives here as
`/discovery/status/500` and answers 500.

- `/.../status/{code}` (any method): answers that status.
- `/.../slow/{seconds}`: sleeps that long (60 s at most), then answers 200.
- `/.../flaky?rate=0.3`: fails with 500 at that rate (0.5 when left out), else 200.
- `/.../stream/{count}?delay=0.05`: 200, streamed: `count` lines of about 1 KiB (10,000 at
  most), `delay` seconds apart (60 s at most), to watch a response arrive piece by piece.
- `/.../set-cookie?name=value`: 200 with a `Set-Cookie` for each query parameter.
- `/.../response-headers?Name=value`: 200 with each query parameter as a response header.
- `GET /_stats`: `{"requests": n}`, the requests served so far, `/_stats` itself excluded.
- anything else: 200 with a JSON echo of the method, path, query, headers, body and the
  client's address (which tells whether a proxy reuses its connections).
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
MAX_SLEEP_SECONDS = 60.0
MAX_ECHO_BYTES = 64 * 1024
MAX_STREAM_LINES = 10_000
_EMPTY_BODY_STATUSES = frozenset({204, 205, 304})


def create_app() -> Starlette:
    """A fresh demo upstream with its own request counter."""
    served = 0

    async def stats(request: Request) -> Response:
        return JSONResponse({"requests": served})

    async def handle(request: Request) -> Response:
        nonlocal served
        served += 1
        segments = [s for s in request.url.path.split("/") if s]
        if len(segments) >= 2 and segments[-2] == "status":
            return _status(segments[-1])
        if len(segments) >= 2 and segments[-2] == "slow":
            return await _slow(segments[-1])
        if segments and segments[-1] == "flaky":
            return _flaky(request.query_params.get("rate", "0.5"))
        if len(segments) >= 2 and segments[-2] == "stream":
            return _stream(segments[-1], request.query_params.get("delay", "0.05"))
        if segments and segments[-1] == "set-cookie":
            return _set_cookie(request)
        if segments and segments[-1] == "response-headers":
            return _response_headers(request)
        return await _echo(request)

    return Starlette(
        routes=[
            Route("/_stats", stats, methods=["GET"]),
            Route("/{path:path}", handle, methods=METHODS),
        ]
    )


def _status(raw: str) -> Response:
    try:
        code = int(raw)
    except ValueError:
        code = 0
    if not 200 <= code <= 599:
        return _error(400, f"status must be an integer in 200-599, got {raw!r}")
    if code in _EMPTY_BODY_STATUSES:
        return Response(status_code=code)
    return JSONResponse({"status": code}, status_code=code)


async def _slow(raw: str) -> Response:
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not 0 <= seconds <= MAX_SLEEP_SECONDS:
        return _error(400, f"seconds must be a number in 0-{MAX_SLEEP_SECONDS:g}, got {raw!r}")
    await asyncio.sleep(seconds)
    return JSONResponse({"slept": seconds})


def _flaky(raw: str) -> Response:
    try:
        rate = float(raw)
    except ValueError:
        rate = math.nan
    if not 0 <= rate <= 1:
        return _error(400, f"rate must be a number in 0-1, got {raw!r}")
    if random.random() < rate:
        return JSONResponse({"status": 500, "flaky": True, "rate": rate}, status_code=500)
    return JSONResponse({"status": 200, "flaky": True, "rate": rate})


def _stream(raw_count: str, raw_delay: str) -> Response:
    try:
        count, delay = int(raw_count), float(raw_delay)
    except ValueError:
        count, delay = -1, math.nan
    if not (0 <= count <= MAX_STREAM_LINES and 0 <= delay <= MAX_SLEEP_SECONDS):
        return _error(400, f"count in 0-{MAX_STREAM_LINES}, delay in 0-60 s, got {raw_count!r}")

    async def lines() -> AsyncIterator[bytes]:
        for number in range(count):
            if number:
                await asyncio.sleep(delay)
            yield b"%06d " % number + b"." * 1017 + b"\n"

    return StreamingResponse(lines(), media_type="text/plain")


def _set_cookie(request: Request) -> Response:
    response = JSONResponse({"set": dict(request.query_params)})
    for name, value in request.query_params.items():
        response.set_cookie(name, value)
    return response


def _response_headers(request: Request) -> Response:
    """Answers with each query parameter as a response header (what a hostile upstream sends)."""
    response = JSONResponse({"headers": dict(request.query_params)})
    for name, value in request.query_params.items():
        response.headers[name] = value
    return response


async def _echo(request: Request) -> Response:
    body = await request.body()
    doc: dict[str, Any] = {
        "method": request.method,
        "path": request.scope["path"],  # percent-decoded, as the server passed it on
        "raw_path": request.scope.get("raw_path", b"").decode("latin-1"),
        "query": request.url.query,
        "headers": dict(request.headers),
        "body": body[:MAX_ECHO_BYTES].decode("utf-8", errors="replace"),
        "body_bytes": len(body),
        "client": f"{request.client.host}:{request.client.port}" if request.client else None,
    }
    return JSONResponse(doc)


def _error(status: int, detail: str) -> Response:
    return JSONResponse({"status": status, "detail": detail}, status_code=status)


app = create_app()
