"""A TCP proxy on loopback that makes the network to Redis slow, or silent.

`DelayProxy(target_port)` listens on a free loopback port and forwards every connection to
`127.0.0.1:target_port`. Each chunk, in either direction, is held back by `delay` seconds (its
order kept, so a delay adds latency without capping throughput). `blackhole()` makes it drop
everything it reads, on every link or only on chosen ones, without closing any connection: what a
dead route or a firewall that drops packets looks like to a client. `restore()` undoes both.

The proxy runs its own asyncio loop in a thread, so it keeps forwarding while the test's loop is
busy or blocked in a synchronous call (starting a gateway, a sync Redis client).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

_CHUNK = 65536


@dataclass(eq=False)
class Link:
    """One proxied connection: client -> proxy -> Redis."""

    client_port: int
    upstream_port: int  # the proxy's own port towards Redis: Redis's CLIENT LIST shows it
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    forwarded: int = 0
    dropped: int = 0


class DelayProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.delay = 0.0
        """Seconds each chunk is held back, in each direction."""
        self._holed_all = False
        self._holed_ports: set[int] = set()
        self._links: set[Link] = set()
        self.dropped_bytes = 0
        """Bytes thrown away by the blackhole so far, over every link, closed ones included."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._done: asyncio.Event | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    # -- control (from any thread) -------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="delay-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the proxy did not start listening within 10 s")
        if self._error is not None:
            raise RuntimeError("the proxy failed to start") from self._error

    def stop(self) -> None:
        if self._loop is not None and self._done is not None and self._thread is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already gone
                self._loop.call_soon_threadsafe(self._done.set)
            self._thread.join(10)

    def blackhole(self, upstream_ports: Iterable[int] | None = None) -> None:
        """Drop every byte from now on: on all links, or on those with these upstream ports."""
        if upstream_ports is None:
            self._holed_all = True
        else:
            self._holed_ports |= set(upstream_ports)

    def restore(self) -> None:
        """Forward again, without delay. Links that lost bytes meanwhile stay as they are."""
        self._holed_all = False
        self._holed_ports = set()
        self.delay = 0.0

    def links(self) -> list[Link]:
        return list(self._links)

    # -- the proxy's own loop --------------------------------------------------------------

    def _holed(self, link: Link) -> bool:
        return self._holed_all or link.upstream_port in self._holed_ports

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            await self._done.wait()
        finally:
            self._server.close()
            for link in list(self._links):
                for task in link.tasks:
                    task.cancel()
                for writer in link.writers:
                    writer.close()
            tasks = [t for link in list(self._links) for t in link.tasks]
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            redis_r, redis_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.close()  # Redis is down: the client sees its connection closed
            return
        link = Link(
            client_port=client_w.get_extra_info("peername")[1],
            upstream_port=redis_w.get_extra_info("sockname")[1],
            writers=[client_w, redis_w],
        )
        self._links.add(link)
        link.tasks = [
            asyncio.create_task(self._pipe(link, client_r, redis_w)),
            asyncio.create_task(self._pipe(link, redis_r, client_w)),
        ]
        try:
            await asyncio.gather(*link.tasks, return_exceptions=True)
        finally:
            self._links.discard(link)
            for writer in link.writers:
                writer.close()

    async def _pipe(
        self, link: Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Forward one direction; each chunk leaves `delay` seconds after it arrived."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def read() -> None:
            try:
                while chunk := await reader.read(_CHUNK):
                    if self._holed(link):
                        link.dropped += len(chunk)
                        self.dropped_bytes += len(chunk)
                    else:
                        queue.put_nowait((loop.time() + self.delay, chunk))
            except OSError:
                pass
            finally:
                queue.put_nowait(None)

        reading = asyncio.create_task(read())
        try:
            while (item := await queue.get()) is not None:
                due, chunk = item
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)  # the delay this proxy exists to add
                if self._holed(link):
                    link.dropped += len(chunk)
                    self.dropped_bytes += len(chunk)
                    continue
                writer.write(chunk)
                await writer.drain()
                link.forwarded += len(chunk)
        except OSError:
            pass
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
            # One side closed: close both, as a TCP proxy would.
            for w in link.writers:
                w.close()
