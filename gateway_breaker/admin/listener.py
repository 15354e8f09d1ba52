"""The admin surface on a listener of its own (`admin.port`), started and stopped with the app.

An upstream's page served through the gateway shares the gateway's origin: on its own port the
dashboard shares nothing with it (no storage, no service worker scope, no cookies). The listener
is a uvicorn server inside the app's event loop; several workers share the port (SO_REUSEPORT),
as they share the gateway's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from typing import Any

from starlette.types import ASGIApp

from gateway_breaker.errors import ConfigError

logger = logging.getLogger("gateway_breaker")

STOP_SECONDS = 2
"""Open requests (an event stream) get this long to end when the app stops."""


class AdminListener:
    """Serves `app` on `host:port` between `start()` and `stop()`."""

    def __init__(self, app: ASGIApp, host: str, port: int) -> None:
        try:
            import uvicorn
        except ImportError:
            raise ConfigError(
                "admin.port: serving the admin API on its own port needs uvicorn"
                " (pip install uvicorn)"
            ) from None
        self.host = host
        self.port = port
        self._config = uvicorn.Config(
            app,
            lifespan="off",  # the gateway's own lifespan starts and stops what the app uses
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=STOP_SECONDS,
        )
        self._server: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Bind and serve; raises OSError (port taken) before anything is served."""
        import uvicorn

        class _Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                yield  # the gateway's server handles signals; this one stops with the app

        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        reuse = hasattr(socket, "SO_REUSEPORT")
        sock = socket.create_server(
            (self.host, self.port), family=family, reuse_port=reuse, backlog=128
        )
        sock.set_inheritable(True)
        self._server = _Server(self._config)
        self._task = asyncio.ensure_future(self._server.serve(sockets=[sock]))
        while not self._server.started and not self._task.done():  # noqa: ASYNC110 - uvicorn has no event for it
            await asyncio.sleep(0.01)
        if self._task.done():
            self._task.result()  # raises what stopped it
            raise OSError(f"the admin listener on {self.host}:{self.port} did not start")
        logger.info("Admin API listening on its own port (host=%s, port=%s)", self.host, self.port)

    async def stop(self) -> None:
        server, task, self._task = self._server, self._task, None
        if server is None or task is None:
            return
        server.should_exit = True
        try:
            async with asyncio.timeout(STOP_SECONDS * 3):
                await task
        except TimeoutError:
            task.cancel()
        except Exception:
            logger.warning("Admin listener stopped with an error", exc_info=True)
