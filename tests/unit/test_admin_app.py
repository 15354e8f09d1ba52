"""The admin API app on an in-memory manager, through httpx's ASGITransport and raw ASGI calls."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.types import Message

from gateway_breaker import CircuitBreakerManager
from gateway_breaker.admin import MAX_BODY_BYTES, admin_app
from gateway_breaker.errors import ConfigError
from tests.helpers import wait_until
from tests.unit.support import make_config

TOKEN = "s3cret-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PATH = "/_breakers"
SERVICES: dict[str, dict[str, Any]] = {
    "sona": {"failure_threshold": 3, "timeout_seconds": 10},
    "discovery": {"failure_threshold": 3, "timeout_seconds": 1},
}
VIEW_KEYS = {
    "service",
    "state",
    "automatic_state",
    "failure_count",
    "success_count",
    "failure_rate",
    "window",
    "calls",
    "last_failure_time",
    "opened_at",
    "retry_after",
    "version",
    "manual",
    "policy",
    "policy_overridden",
    "local",
    "health",
    "rejection_probability",
}


def _new_manager() -> CircuitBreakerManager:
    return CircuitBreakerManager(make_config(SERVICES))


@pytest.fixture
async def manager() -> AsyncIterator[CircuitBreakerManager]:
    manager = _new_manager()
    await manager.start()
    try:
        yield manager
    finally:
        await manager.aclose()


@pytest.fixture
def static_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "static"
    folder.mkdir()
    (folder / "index.html").write_text("<!doctype html><title>breakers</title>")
    (folder / "app.js").write_text("console.log('hi')")
    (folder / "style.css").write_text("body{}")
    (folder / "notes.exe").write_text("no")
    return folder


@pytest.fixture
async def client(
    manager: CircuitBreakerManager, static_dir: Path
) -> AsyncIterator[httpx.AsyncClient]:
    app = admin_app(manager, token=TOKEN, path=PATH, static_dir=static_dir)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://admin") as client:
        yield client


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert {"type", "title", "detail"} <= body.keys()
    return body


# -- auth -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": "Bearer"},
    ],
)
@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("GET", "/breakers"),
        ("GET", "/breakers/sona"),
        ("GET", "/breakers/nosuch"),
        ("PUT", "/breakers/sona/manual"),
        ("DELETE", "/breakers/sona/manual"),
        ("POST", "/breakers/sona/reset"),
        ("GET", "/breakers/sona/history"),
        ("PATCH", "/breakers/sona/policy"),
        ("DELETE", "/breakers/sona/policy"),
        ("GET", "/fleet"),
        ("GET", "/events"),
    ],
)
async def test_every_api_call_needs_the_token(
    client: httpx.AsyncClient, method: str, url: str, headers: dict[str, str]
) -> None:
    response = await client.request(method, PATH + url, headers=headers, json={"mode": "disabled"})
    body = assert_problem(response, 401)
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert TOKEN not in response.text
    assert "wrong" not in response.text
    assert body["title"] == "Unauthorized"


async def test_a_refused_command_changes_nothing(
    client: httpx.AsyncClient, manager: CircuitBreakerManager
) -> None:
    response = await client.put(
        f"{PATH}/breakers/sona/manual", json={"mode": "forced_open"}, headers={"Authorization": "x"}
    )
    assert response.status_code == 401
    assert manager.view("sona").state == "closed"


def test_an_empty_token_is_refused(manager: CircuitBreakerManager) -> None:
    with pytest.raises(ConfigError, match=r"admin\.token"):
        admin_app(manager, token="  ", path=PATH)


# -- views ------------------------------------------------------------------------------------


async def test_list_and_one_breaker(
    client: httpx.AsyncClient, manager: CircuitBreakerManager
) -> None:
    response = await client.get(f"{PATH}/breakers", headers=AUTH)
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["instance"] == manager.instance_id
    assert body["store"] == "memory"
    assert body["store_up"] is None
    assert [b["service"] for b in body["breakers"]] == ["discovery", "sona"]
    for breaker in body["breakers"]:
        assert set(breaker) == VIEW_KEYS
        assert breaker["state"] == "closed"
        assert breaker["manual"] is None
        assert set(breaker["calls"]) == {
            "success",
            "failure",
            "slow",
            "rejected",
            "shed",
            "ignored",
        }

    one = (await client.get(f"{PATH}/breakers/sona", headers=AUTH)).json()
    assert one["service"] == "sona"
    assert one["policy"]["failure_threshold"] == 3


@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("GET", "/breakers/nosuch"),
        ("PUT", "/breakers/nosuch/manual"),
        ("DELETE", "/breakers/nosuch/manual"),
        ("POST", "/breakers/nosuch/reset"),
        ("GET", "/breakers/nosuch/history"),
        ("PATCH", "/breakers/nosuch/policy"),
        ("DELETE", "/breakers/nosuch/policy"),
        ("GET", "/breakers/%20bad%3Cname%3E/history"),
    ],
)
async def test_unknown_service_is_404(client: httpx.AsyncClient, method: str, url: str) -> None:
    body = {"mode": "disabled"} if method == "PUT" else {"failure_threshold": 2}
    response = await client.request(method, PATH + url, headers=AUTH, json=body)
    problem = assert_problem(response, 404)
    assert "unknown service" in problem["detail"]


async def test_unknown_endpoint_and_method(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get(f"{PATH}/nothing", headers=AUTH), 404)
    assert_problem(await client.post(f"{PATH}/breakers", headers=AUTH), 405)


# -- manual modes, reset, history -------------------------------------------------------------


async def test_manual_mode_set_and_lifted(
    client: httpx.AsyncClient, manager: CircuitBreakerManager
) -> None:
    response = await client.put(
        f"{PATH}/breakers/sona/manual",
        json={"mode": "forced_open", "seconds": 60, "reason": "maintenance window"},
        headers=AUTH,
    )
    assert response.status_code == 200, response.text
    view = response.json()
    assert view["state"] == "forced_open"
    assert view["manual"]["mode"] == "forced_open"
    assert view["manual"]["reason"] == "maintenance window"
    assert view["manual"]["until"] is not None
    assert manager.view("sona").state == "forced_open"

    history = (await client.get(f"{PATH}/breakers/sona/history", headers=AUTH)).json()
    assert history["service"] == "sona"
    newest = history["history"][0]
    assert newest["to"] == "forced_open"
    assert newest["cause"] == "manual"
    assert newest["reason"] == "maintenance window"

    lifted = await client.delete(f"{PATH}/breakers/sona/manual", headers=AUTH)
    assert lifted.status_code == 200
    assert lifted.json()["state"] == "closed"
    assert lifted.json()["manual"] is None


@pytest.mark.parametrize("mode", ["disabled", "metrics_only"])
async def test_other_modes(client: httpx.AsyncClient, mode: str) -> None:
    response = await client.put(
        f"{PATH}/breakers/discovery/manual", json={"mode": mode}, headers=AUTH
    )
    assert response.status_code == 200, response.text
    assert response.json()["state"] == mode
    manual = response.json()["manual"]
    assert (manual["mode"], manual["until"], manual["reason"]) == (mode, None, None)


async def test_reset_closes(client: httpx.AsyncClient, manager: CircuitBreakerManager) -> None:
    await client.put(f"{PATH}/breakers/sona/manual", json={"mode": "forced_open"}, headers=AUTH)
    response = await client.post(f"{PATH}/breakers/sona/reset", headers=AUTH)
    assert response.status_code == 200
    assert response.json()["state"] == "closed"
    assert response.json()["failure_count"] == 0
    history = (await client.get(f"{PATH}/breakers/sona/history?limit=1", headers=AUTH)).json()
    assert len(history["history"]) == 1
    assert history["history"][0]["cause"] == "reset"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"mode": "closed"}, "mode"),
        ({}, "mode"),
        ({"mode": 3}, "mode"),
        ({"mode": "forced_open", "seconds": 0}, "seconds"),
        ({"mode": "forced_open", "seconds": -5}, "seconds"),
        ({"mode": "forced_open", "seconds": "5"}, "seconds"),
        ({"mode": "forced_open", "seconds": True}, "seconds"),
        ({"mode": "forced_open", "seconds": 1e300}, "seconds"),
        ({"mode": "forced_open", "reason": "x" * 201}, "reason"),
        ({"mode": "forced_open", "reason": "two\nlines"}, "reason"),
        ({"mode": "forced_open", "reason": 5}, "reason"),
        ({"mode": "forced_open", "until": 5}, "until"),
        ([1, 2], "body"),
        ("forced_open", "body"),
    ],
)
async def test_invalid_manual_body_is_422_naming_the_field(
    client: httpx.AsyncClient, manager: CircuitBreakerManager, body: Any, field: str
) -> None:
    response = await client.put(f"{PATH}/breakers/sona/manual", json=body, headers=AUTH)
    problem = assert_problem(response, 422)
    assert problem["errors"][0]["field"] == field
    assert problem["detail"].startswith(field)
    assert manager.view("sona").state == "closed"


@pytest.mark.parametrize("limit", ["0", "1001", "-1", "abc", "1.5", ""])
async def test_history_limit_is_checked(client: httpx.AsyncClient, limit: str) -> None:
    response = await client.get(f"{PATH}/breakers/sona/history?limit={limit}", headers=AUTH)
    assert assert_problem(response, 422)["errors"][0]["field"] == "limit"


# -- hostile bodies ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "headers", "status"),
    [
        (b"not json", {}, 400),
        (b"", {}, 400),
        (b"{", {}, 400),
        (b'{"mode": NaN}', {}, 400),
        (b'{"mode": "forced_open", "seconds": Infinity}', {}, 400),
        (b"[" * 50_000 + b"]" * 50_000, {}, 413),
        (b"[" * 30_000 + b"]" * 30_000, {}, 400),
        (b'{"a":' * 10_000 + b"1" + b"}" * 10_000, {}, 400),
        (b'{"mode": "disabled"}', {"content-type": "text/plain"}, 415),
        (b"\xff\xfe\x00garbage", {}, 400),
        (b'"' + b"x" * (MAX_BODY_BYTES + 10) + b'"', {}, 413),
    ],
)
@pytest.mark.parametrize("url", ["/breakers/sona/manual", "/breakers/sona/policy"])
async def test_hostile_bodies_are_4xx(
    client: httpx.AsyncClient, url: str, content: bytes, headers: dict[str, str], status: int
) -> None:
    method = "PUT" if url.endswith("manual") else "PATCH"
    all_headers = {"content-type": "application/json", **AUTH, **headers}
    response = await client.request(method, PATH + url, content=content, headers=all_headers)
    assert_problem(response, status)


async def test_a_body_without_length_is_cut_at_the_limit(client: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b" " * 4096

    response = await client.put(
        f"{PATH}/breakers/sona/manual",
        content=chunks(),
        headers={"content-type": "application/json", **AUTH},
    )
    assert_problem(response, 413)


# -- policy -----------------------------------------------------------------------------------


async def test_policy_patch_and_delete(
    client: httpx.AsyncClient, manager: CircuitBreakerManager
) -> None:
    response = await client.patch(
        f"{PATH}/breakers/sona/policy",
        json={"failure_threshold": 2, "failure_status_codes": ["5xx", 429]},
        headers=AUTH,
    )
    assert response.status_code == 200, response.text
    view = response.json()
    assert view["policy"]["failure_threshold"] == 2
    assert view["policy_overridden"] is True
    assert manager.view("sona").policy.failure_threshold == 2

    back = await client.delete(f"{PATH}/breakers/sona/policy", headers=AUTH)
    assert back.status_code == 200
    assert back.json()["policy"]["failure_threshold"] == 3
    assert back.json()["policy_overridden"] is False


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"failure_threshold": 0}, "failure_threshold"),
        ({"failure_threshold": "5"}, "failure_threshold"),
        ({"failure_threshold": 2.5}, "failure_threshold"),
        ({"failure_threshold": True}, "failure_threshold"),
        ({"error_rate_threshold": 1.5}, "error_rate_threshold"),
        ({"timeout_seconds": -1}, "timeout_seconds"),
        ({"max_timeout_seconds": 1}, "max_timeout_seconds"),
        ({"failure_status_codes": ["abc"]}, "failure_status_codes"),
        ({"failure_status_codes": []}, "failure_status_codes"),
        ({"no_such_field": 1}, "no_such_field"),
        ({"prefix": "/other"}, "prefix"),
        ({}, "body"),
        ([{"failure_threshold": 2}], "body"),
        (None, "body"),
    ],
)
async def test_invalid_policy_is_422_naming_the_field(
    client: httpx.AsyncClient, manager: CircuitBreakerManager, body: Any, field: str
) -> None:
    response = await client.patch(
        f"{PATH}/breakers/sona/policy",
        content=json.dumps(body),
        headers={"content-type": "application/json", **AUTH},
    )
    problem = assert_problem(response, 422)
    assert problem["errors"][0]["field"] == field, problem
    assert manager.view("sona").policy.failure_threshold == 3
    assert manager.view("sona").policy_overridden is False


# -- fleet, OpenAPI, pages --------------------------------------------------------------------


async def test_fleet_in_memory_is_this_instance(
    client: httpx.AsyncClient, manager: CircuitBreakerManager
) -> None:
    body = (await client.get(f"{PATH}/fleet", headers=AUTH)).json()
    assert [i["id"] for i in body["instances"]] == [manager.instance_id]
    assert body["instances"][0]["breakers"]["sona"]["state"] == "closed"
    assert body["store"] == {}


async def test_openapi_document(client: httpx.AsyncClient) -> None:
    response = await client.get(f"{PATH}/openapi.json")
    assert response.status_code == 200
    doc = response.json()
    assert doc["openapi"].startswith("3.1")
    assert doc["servers"] == [{"url": PATH}]
    assert set(doc["paths"]) == {
        "/breakers",
        "/breakers/{service}",
        "/breakers/{service}/manual",
        "/breakers/{service}/reset",
        "/breakers/{service}/history",
        "/breakers/{service}/policy",
        "/fleet",
        "/events",
    }
    patch = doc["components"]["schemas"]["PolicyPatch"]
    assert "failure_threshold" in patch["properties"]
    assert patch["additionalProperties"] is False


async def test_dashboard_page_and_static_files(client: httpx.AsyncClient) -> None:
    page = await client.get(f"{PATH}/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["x-content-type-options"] == "nosniff"
    assert "<title>breakers</title>" in page.text

    redirect = await client.get(PATH)
    assert redirect.status_code == 308
    assert redirect.headers["location"].endswith(f"{PATH}/")

    js = await client.get(f"{PATH}/static/app.js")
    assert js.status_code == 200
    assert js.headers["content-type"] == "text/javascript; charset=utf-8"
    css = await client.get(f"{PATH}/static/style.css")
    assert css.headers["content-type"] == "text/css; charset=utf-8"

    for name in ["notes.exe", "missing.js", "..%2Fsecret.js", ".hidden.js", "%2e%2e"]:
        assert (await client.get(f"{PATH}/static/{name}")).status_code == 404, name
    assert (await client.get(f"{PATH}/static/../app.py")).status_code == 404


async def test_mountable_anywhere(manager: CircuitBreakerManager, static_dir: Path) -> None:
    inner = admin_app(manager, token=TOKEN, static_dir=static_dir)
    app = Starlette(routes=[Mount("/ops/breakers", app=inner)])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://admin") as client:
        response = await client.get("/ops/breakers/breakers/sona", headers=AUTH)
        assert response.status_code == 200
        assert response.json()["service"] == "sona"
        assert (await client.get("/ops/breakers/breakers")).status_code == 401
        assert (await client.get("/ops/breakers/")).status_code == 200


# -- events -----------------------------------------------------------------------------------


class SSEClient:
    """Runs the app on one raw ASGI GET and collects what it sends."""

    def __init__(self, app: Starlette, headers: dict[str, str]) -> None:
        self.app = app
        self.scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": f"{PATH}/events",
            "raw_path": f"{PATH}/events".encode(),
            "root_path": "",
            "query_string": b"",
            "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
            "server": ("admin", 80),
            "client": ("127.0.0.1", 5000),
        }
        self.messages: list[Message] = []
        self.gone = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def _receive(self) -> Message:
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: Message) -> None:
        self.messages.append(message)

    def start(self) -> None:
        self.task = asyncio.ensure_future(self.app(self.scope, self._receive, self._send))

    @property
    def text(self) -> str:
        return b"".join(m.get("body", b"") for m in self.messages[1:]).decode()

    def events(self) -> list[dict[str, Any]]:
        found = []
        for frame in self.text.split("\n\n"):
            lines = dict(
                line.split(": ", 1) for line in frame.splitlines() if not line.startswith(":")
            )
            if lines.get("event") == "transition":
                data = json.loads(lines["data"])
                assert str(data["id"]) == lines["id"]
                found.append(data)
        return found

    async def close(self) -> None:
        self.gone.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, 5)


async def test_events_stream_transitions_and_ends_on_disconnect(
    manager: CircuitBreakerManager, static_dir: Path
) -> None:
    app = admin_app(manager, token=TOKEN, path=PATH, static_dir=static_dir)
    sse = SSEClient(app, AUTH)
    sse.start()
    await wait_until(lambda: ": connected" in sse.text, message="the stream to open")
    start = sse.messages[0]
    assert start["status"] == 200
    assert (b"content-type", b"text/event-stream; charset=utf-8") in start["headers"]

    await manager.set_manual("sona", "forced_open", reason="incident 42")
    await wait_until(lambda: len(sse.events()) == 1, message="the event")
    event = sse.events()[0]
    assert event["service"] == "sona"
    assert event["to"] == "forced_open"
    assert event["reason"] == "incident 42"
    assert event["breaker"]["state"] == "forced_open"

    await sse.close()  # returns: the stream ended when the client left

    # A client that comes back with Last-Event-ID gets what it missed, and nothing before.
    await manager.clear_manual("sona")
    again = SSEClient(app, {**AUTH, "Last-Event-ID": str(event["id"])})
    again.start()
    await wait_until(lambda: len(again.events()) == 1, message="the replayed event")
    assert again.events()[0]["cause"] == "manual_released"
    await again.close()


async def test_events_keepalive_comments(manager: CircuitBreakerManager) -> None:
    from gateway_breaker.admin.app import EventStreamResponse

    response = EventStreamResponse(manager, None, keepalive=0.01)
    sse = SSEClient(Starlette(), {})
    sse.app = response  # type: ignore[assignment]
    sse.start()
    await wait_until(lambda: sse.text.count(": keepalive") >= 2, message="keepalive comments")
    await sse.close()


async def test_events_bad_last_event_id(client: httpx.AsyncClient) -> None:
    response = await client.get(f"{PATH}/events", headers={**AUTH, "Last-Event-ID": "x"})
    assert assert_problem(response, 422)["errors"][0]["field"] == "Last-Event-ID"


async def test_events_stream_ends_cleanly_when_cancelled(
    manager: CircuitBreakerManager, static_dir: Path
) -> None:
    # A server that stops waiting for open requests (uvicorn --timeout-graceful-shutdown)
    # cancels them: the stream stops and leaves no task behind.
    app = admin_app(manager, token=TOKEN, path=PATH, static_dir=static_dir)
    sse = SSEClient(app, AUTH)
    before = set(asyncio.all_tasks())
    sse.start()
    await wait_until(lambda: ": connected" in sse.text, message="the stream to open")
    assert sse.task is not None
    sse.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sse.task
    await wait_until(lambda: set(asyncio.all_tasks()) <= before, message="no task left")


async def test_commands_without_a_body_take_a_reason(client: httpx.AsyncClient) -> None:
    await client.put(f"{PATH}/breakers/sona/manual", json={"mode": "disabled"}, headers=AUTH)
    released = await client.delete(
        f"{PATH}/breakers/sona/manual", params={"reason": "all clear"}, headers=AUTH
    )
    assert released.status_code == 200
    reset = await client.post(f"{PATH}/breakers/sona/reset?reason=fresh%20start", headers=AUTH)
    assert reset.status_code == 200
    history = (await client.get(f"{PATH}/breakers/sona/history", headers=AUTH)).json()["history"]
    assert [(e["cause"], e["reason"]) for e in history[:2]] == [
        ("reset", "fresh start"),
        ("manual_released", "all clear"),
    ]
    for bad in ["x" * 201, "two\nlines", "tab\there", "end\n"]:
        response = await client.post(
            f"{PATH}/breakers/sona/reset", params={"reason": bad}, headers=AUTH
        )
        assert assert_problem(response, 422)["errors"][0]["field"] == "reason"
