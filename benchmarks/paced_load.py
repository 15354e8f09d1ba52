"""An open-loop load generator: GET requests at a fixed rate, latency from the scheduled time.

A closed-loop generator (wrk) sends the next request when an answer arrives, so at saturation
its latency is mostly queueing, and a slow answer delays the requests behind it instead of
being counted against them ("coordinated omission"). This one schedules request i at
start + i / rate, whatever the server does, sends it on an idle keep-alive connection (opening
no new ones: `connections` are opened first), and measures each latency from the scheduled
time, so waiting for a free connection counts too. wrk2 does this in C; it is not packaged in
Debian, so this is the same idea in Python on uvloop. The scheduler wakes every millisecond at
most (the event loop's timer resolution) and sends what is due: requests within one
millisecond go out together, the same for every contender.

Used by `benchmarks/e2e_load.py --paced FRACTION`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

from _common import quantile


@dataclass
class Paced:
    rate: float  # requests/s asked for
    sent: int
    seconds: float
    p50_us: float
    p90_us: float
    p99_us: float
    not_2xx: int
    errors: int  # failed or unanswered


async def read_response(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response (Content-Length or chunked) off `reader`; its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    length, chunked = 0, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            await reader.readexactly(size + 2)
        await reader.readuntil(b"\r\n")
    elif length:
        await reader.readexactly(length)
    return int(head[9:12])


async def paced_load(
    host: str, port: int, path: str, rate: float, seconds: float, connections: int = 64
) -> Paced:
    payload = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: paced_load\r\n\r\n"
    request = payload.encode()
    streams = [await asyncio.open_connection(host, port) for _ in range(connections)]
    idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    for stream in streams:
        idle.put_nowait(stream)
    latencies: list[float] = []
    not_2xx = 0
    pending: set[asyncio.Task[None]] = set()

    async def one(scheduled: float) -> None:
        nonlocal not_2xx
        reader, writer = await idle.get()
        try:
            writer.write(request)
            status = await read_response(reader)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            return  # counted as unanswered; the connection is not put back
        latencies.append(time.perf_counter() - scheduled)
        if not 200 <= status < 400:
            not_2xx += 1
        idle.put_nowait((reader, writer))

    total = int(rate * seconds)
    start = time.perf_counter() + 0.01
    for i in range(total):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0.0005:
            await asyncio.sleep(delay)
        task = asyncio.ensure_future(one(scheduled))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.wait(pending, timeout=30)
    elapsed = time.perf_counter() - start
    for _, writer in streams:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    if not latencies:
        raise RuntimeError(f"no response from {host}:{port}")
    return Paced(
        rate=rate,
        sent=total,
        seconds=elapsed,
        p50_us=quantile(latencies, 0.5) * 1e6,
        p90_us=quantile(latencies, 0.9) * 1e6,
        p99_us=quantile(latencies, 0.99) * 1e6,
        not_2xx=not_2xx,
        errors=total - len(latencies),  # failed or unanswered
    )


def run_paced(port: int, path: str, rate: float, seconds: float) -> Paced:
    """`paced_load` on uvloop when it is installed (less generator jitter), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(paced_load("127.0.0.1", port, path, rate, seconds))
    return uvloop.run(paced_load("127.0.0.1", port, path, rate, seconds))
