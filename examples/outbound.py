"""Outbound calls under the fleet's breakers: an endpoint that aggregates two upstreams.

Run the demo upstream and this app from the repository root:

    uvicorn examples.upstream:app --port 9001
    uvicorn examples.outbound:app --port 8000

`GET /home/{user}` calls `profile` and `recommendations` at once through one
`httpx.AsyncClient` whose transport is a `BreakerTransport`: each request is guarded by the
breaker of the service whose `upstream` it goes to. When one breaker is open the answer is
partial: the other part, plus `degraded` naming what is missing and why; the open upstream is
not called at all. `?fail=recommendations` (or `profile`) sends that call to the demo
upstream's `/status/500`, to open its breaker on purpose (three failures; it probes again after
five seconds).

Environment: `PROFILE_UPSTREAM` (default `http://127.0.0.1:9001/profile`) and
`RECOMMENDATIONS_UPSTREAM` (default `http://127.0.0.1:9001/recommendations`); `REDIS_URL`
shares the breakers with every other instance (and gateway) on that Redis.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI

from gateway_breaker import (
    BreakerTransport,
    CircuitBreakerManager,
    CircuitOpenError,
    Config,
    route_by_origin,
)

UPSTREAMS = {
    "profile": os.environ.get("PROFILE_UPSTREAM", "http://127.0.0.1:9001/profile"),
    "recommendations": os.environ.get(
        "RECOMMENDATIONS_UPSTREAM", "http://127.0.0.1:9001/recommendations"
    ),
}
POLICY = {"failure_threshold": 3, "timeout_seconds": 5}

config = Config(
    circuit_breaker={
        "services": {name: {"upstream": url, **POLICY} for name, url in UPSTREAMS.items()}
    }
)
manager = CircuitBreakerManager.from_config(config)  # Redis when REDIS_URL is set
clients: dict[str, httpx.AsyncClient] = {}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    await manager.start()
    # One client for every upstream: the transport picks each request's breaker by origin.
    transport = BreakerTransport(manager, service=route_by_origin(manager))
    async with httpx.AsyncClient(transport=transport, timeout=5.0) as client:
        clients["upstreams"] = client
        yield
    await manager.aclose()


app = FastAPI(title="gateway-breaker outbound example", lifespan=lifespan)


async def fetch(service: str, path: str, fail: bool) -> tuple[Any, str | None]:
    """The upstream's JSON answer, or None and why it is missing."""
    url = f"{UPSTREAMS[service]}/status/500" if fail else f"{UPSTREAMS[service]}{path}"
    try:
        response = await clients["upstreams"].get(url)
    except CircuitOpenError as exc:  # catch it before httpx.TransportError: it is one too
        return None, f"circuit open, retry in {exc.retry_after:.0f}s"
    except httpx.TransportError as exc:
        return None, f"unreachable: {type(exc).__name__}"
    if response.is_error:
        return None, f"status {response.status_code}"
    return response.json(), None


@app.get("/home/{user}")
async def home(user: str, fail: str | None = None) -> dict[str, Any]:
    """The user's profile and recommendations; whatever is missing is named in `degraded`."""
    (profile, profile_error), (picks, picks_error) = await asyncio.gather(
        fetch("profile", f"/users/{user}", fail == "profile"),
        fetch("recommendations", f"/for/{user}", fail == "recommendations"),
    )
    degraded = {
        name: error
        for name, error in (("profile", profile_error), ("recommendations", picks_error))
        if error is not None
    }
    return {"user": user, "profile": profile, "recommendations": picks, "degraded": degraded}


@app.get("/breakers")
async def breakers() -> dict[str, str]:
    """Each breaker's state as this instance sees it."""
    return {view.service: view.state for view in manager.views()}
