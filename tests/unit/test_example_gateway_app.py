"""The example gateway's app object: its runtime settings while serving, and its own call path."""

from __future__ import annotations

import asyncio
import gc

from starlette.types import Message

from examples.gateway import YOUNG_GC_THRESHOLD, GatewayApp, create_app
from tests.unit.support import asgi_get, make_config

CONFIG = make_config({"discovery": {"upstream": "http://127.0.0.1:9/discovery"}})


async def test_serving_sets_the_young_collection_threshold_and_shutdown_restores_it() -> None:
    before = gc.get_threshold()
    app = create_app(CONFIG)
    incoming: asyncio.Queue[Message] = asyncio.Queue()
    sent: asyncio.Queue[Message] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
    served = asyncio.ensure_future(app(scope, incoming.get, sent.put))
    await incoming.put({"type": "lifespan.startup"})
    assert (await asyncio.wait_for(sent.get(), 10))["type"] == "lifespan.startup.complete"
    assert gc.get_threshold() == (YOUNG_GC_THRESHOLD, *before[1:])
    await incoming.put({"type": "lifespan.shutdown"})
    assert (await asyncio.wait_for(sent.get(), 10))["type"] == "lifespan.shutdown.complete"
    await asyncio.wait_for(served, 10)
    assert gc.get_threshold() == before


def test_only_an_app_with_fastapis_telemetry_off_skips_its_layer() -> None:
    assert create_app(CONFIG).untraced
    assert not GatewayApp().untraced  # FastAPI's defaults: its telemetry layer stays
    assert not GatewayApp(telemetry={"tracing": True, "metrics": False, "logs": False}).untraced


async def test_own_routes_answer_through_the_short_call_path_and_below_a_root_path() -> None:
    app = create_app(CONFIG)
    for root in ("", "/api"):
        messages = await asgi_get(app, f"{root}/healthz", root_path=root)
        assert messages[0]["status"] == 200, root
        assert messages[1]["body"] == b'{"status":"ok"}'
    # A path under no service is the proxy's 404, past the breakers and the dispatch.
    messages = await asgi_get(app, "/nowhere")
    assert messages[0]["status"] == 404
