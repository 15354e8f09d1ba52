"""The example gateway mounted under /api in an outer Starlette app, for the root-path tests.

Run as `uvicorn tests.e2e.mounted_gateway:app`. A mounted app gets no lifespan events of its own,
so the outer app runs the gateway app's own (which opens its upstream transport); the
breaker middleware then starts on the first request, as it does with no lifespan at all.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.routing import Mount

from examples.gateway import create_app

gateway = create_app()


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with gateway.router.lifespan_context(gateway):
        yield


app = Starlette(routes=[Mount("/api", app=gateway)], lifespan=lifespan)
