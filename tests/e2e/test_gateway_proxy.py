"""The example gateway's proxy end to end: transport, header hygiene, and clients that try to
steer a breaker (path spelling, oversized or malformed requests, disconnects, root paths).

Requests whose exact bytes matter go over a raw socket: HTTP clients normalise dot segments and
re-encode paths before they send them, which would hide the very requests under test.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import (
    Gateway,
    ServerProcess,
    StartGateway,
    Upstream,
    clean_env,
    counts,
    make_config,
)
from tests.e2e.test_gateway import fail_discovery
from tests.helpers import wait_until_sync

pytestmark = pytest.mark.e2e

TRANSPORTS = ["aiohttp", "httpx"]


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]


def raw_request(
    port: int,
    target: str,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    timeout: float = 10.0,
) -> RawResponse:
    """One request with exactly this request target, on a connection of its own."""
    head = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body:
        head.append(f"Content-Length: {len(body)}")
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return parse_response(data)


def parse_response(data: bytes) -> RawResponse:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = [
        (name.strip().lower(), value.strip())
        for name, _, value in (line.partition(":") for line in lines[1:])
    ]
    if ("transfer-encoding", "chunked") in headers:
        decoded = b""
        while body:
            size_line, _, body = body.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            decoded, body = decoded + body[:size], body[size + 2 :]
        body = decoded
    return RawResponse(status, headers, body)


def problem(response: RawResponse, status: int) -> dict[str, Any]:
    assert response.status == status, (response.status, response.body)
    assert response.header("content-type") == ["application/problem+json"]
    doc = json.loads(response.body)
    assert isinstance(doc, dict)
    assert doc["status"] == status
    return doc


def assert_count_kept(gateway: Gateway, between: Callable[[], None]) -> None:
    """`between` runs after 2 of discovery's 3 failures: the third must still open it.

    Anything in `between` that reached the breaker as a success would reset the consecutive
    failures, and the third failure would leave it closed.
    """
    fail_discovery(gateway, 2)
    between()
    fail_discovery(gateway, 1)
    gateway.wait_for_log("(service=discovery, from=closed, to=open")
    assert gateway.get("/discovery/anything").status_code == 503


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    name = request.param
    assert isinstance(name, str)
    return name


# -- transport ---------------------------------------------------------------------------------


def test_one_date_one_server_and_via_both_ways(
    start_gateway: StartGateway, upstream: Upstream, transport: str
) -> None:
    gateway = start_gateway(env={"UPSTREAM_TRANSPORT": transport})
    response = raw_request(gateway.port, "/sona/anything", headers={"Via": "1.0 edge"})
    assert response.status == 200, response.body
    assert len(response.header("date")) == 1, response.headers
    assert response.header("server") == ["uvicorn"], "the gateway's own server header"
    assert response.header("via") == ["1.1 gateway-breaker"]
    echo = json.loads(response.body)
    assert echo["headers"]["via"] == "1.0 edge, 1.1 gateway-breaker"
    # The gateway's own answers carry them once too.
    own = raw_request(gateway.port, "/elsewhere")
    assert own.status == 404
    assert len(own.header("date")) == len(own.header("server")) == 1


def test_the_upstream_gets_only_what_the_client_sent(
    start_gateway: StartGateway, upstream: Upstream, transport: str
) -> None:
    """No Accept, Accept-Encoding, User-Agent or Content-Type of the proxy's own HTTP client."""
    gateway = start_gateway(env={"UPSTREAM_TRANSPORT": transport})
    echo = json.loads(raw_request(gateway.port, "/auth/x", headers={"X-One": "1"}).body)
    assert set(echo["headers"]) == {
        "host",
        "x-one",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "via",
    }, echo["headers"]
    posted = json.loads(raw_request(gateway.port, "/auth/x", "POST", body=b"abc").body)
    assert posted["body"] == "abc"
    assert "content-type" not in posted["headers"]
    assert posted["headers"]["content-length"] == "3"


def test_cookies_of_one_answer_never_reach_the_next_request(
    start_gateway: StartGateway, upstream: Upstream, transport: str
) -> None:
    gateway = start_gateway(env={"UPSTREAM_TRANSPORT": transport})
    first = gateway.get("/auth/set-cookie", params={"session": "alice"})
    assert first.status_code == 200
    assert "session=alice" in first.headers["set-cookie"]
    echo = raw_request(gateway.port, "/auth/whoami")
    assert "cookie" not in json.loads(echo.body)["headers"]


def test_upstream_connections_are_kept_alive_and_capped(
    start_gateway: StartGateway, upstream: Upstream, transport: str
) -> None:
    gateway = start_gateway(env={"UPSTREAM_TRANSPORT": transport, "UPSTREAM_MAX_CONNECTIONS": "2"})
    sequential = {gateway.get("/auth/x").json()["client"] for _ in range(20)}
    assert len(sequential) == 1, f"20 requests in a row used {len(sequential)} connections"

    # Eight at once, each held 0.3 s by the upstream: never more than two connections.
    with httpx.Client(base_url=gateway.url, timeout=30, trust_env=False) as client:
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: client.get("/auth/slow/0.3"), range(8)))
        assert [a.status_code for a in answers] == [200] * 8
        after = {client.get("/auth/x").json()["client"] for _ in range(10)}
    assert len(after) <= 2, after


def test_responses_stream_through_and_head_and_204_have_no_body(
    start_gateway: StartGateway, upstream: Upstream, transport: str
) -> None:
    gateway = start_gateway(env={"UPSTREAM_TRANSPORT": transport})
    # The upstream sends its second line an hour after the first: the first line arrives anyway.
    with (
        httpx.Client(base_url=gateway.url, timeout=10, trust_env=False) as client,
        client.stream("GET", "/sona/stream/2", params={"delay": "60"}) as response,
    ):
        assert response.status_code == 200
        first = next(response.iter_raw())
        assert first.startswith(b"000000 ")
    whole = gateway.get("/sona/stream/50", params={"delay": "0"})
    assert whole.content.count(b"\n") == 50
    head = raw_request(gateway.port, "/sona/anything", "HEAD")
    assert head.status == 200
    assert head.body == b""
    empty = raw_request(gateway.port, "/sona/status/204")
    assert (empty.status, empty.body) == (204, b"")


# -- path spelling -----------------------------------------------------------------------------

# Each would let a request charged to one breaker reach another service's upstream, or the
# same upstream by a path its breaker never saw.
TRICK_PATHS = [
    "/discovery/../sona/x",
    "/discovery/./x",
    "/discovery/%2e%2e/sona/x",
    "/discovery/%2E%2e/sona/x",
    "/discovery/..%2fsona/x",
    "/discovery/a%2Fb",
    "/discovery/a%5cb",
    "/discovery/a\\b",
    "/sona/..",
    "/discovery/%00x",
    # Path parameters: Tomcat-style upstreams read `..;` as `..`.
    "/discovery/..;/sona/x",
    "/discovery/..;jsessionid=1/sona/x",
    "/discovery/.;x=1/x",
    "/discovery/%2e%2e;/sona/x",
    "/discovery/..%3b/sona/x",
]


@pytest.mark.parametrize("target", TRICK_PATHS)
def test_dot_segments_and_encoded_separators_are_refused_before_any_breaker(
    start_gateway: StartGateway, upstream: Upstream, target: str
) -> None:
    gateway = start_gateway()
    served = counts(upstream)
    # discovery open: the trick must not reach sona's upstream (or any) past it.
    fail_discovery(gateway, 3)
    gateway.wait_for_log("(service=discovery, from=closed, to=open")
    before = served()
    doc = problem(raw_request(gateway.port, target), 400)
    assert "service" not in doc
    assert served() == before, "a refused request reached an upstream"
    assert gateway.get("/discovery/anything").status_code == 503
    assert gateway.get("/sona/anything").status_code == 200


def test_refused_paths_neither_fail_nor_succeed_for_a_breaker(
    start_gateway: StartGateway, upstream: Upstream
) -> None:
    gateway = start_gateway()

    def tricks() -> None:
        for target in TRICK_PATHS:
            assert raw_request(gateway.port, target).status == 400

    assert_count_kept(gateway, tricks)


def test_the_path_charged_is_the_path_forwarded(
    start_gateway: StartGateway, upstream: Upstream
) -> None:
    gateway = start_gateway()
    echo = json.loads(raw_request(gateway.port, "/sona/a%20b/c%3Fd?q=%2e%2e").body)
    assert echo["path"] == "/sona/a b/c?d"
    assert echo["raw_path"] == "/sona/a%20b/c%3Fd"
    assert echo["query"] == "q=%2e%2e"


# -- oversized and malformed -------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "/discovery/" + "a" * 70_000,
        "/discovery/x?q=" + "a" * 70_000,
        "/discovery/%zz",
        "/discovery/%e9",
        "/discovery/%",
    ],
    ids=["70KB-path", "70KB-query", "bad-escape", "not-utf8", "lone-percent"],
)
def test_oversized_and_malformed_requests_are_answered_by_the_gateway(
    start_gateway: StartGateway, upstream: Upstream, target: str
) -> None:
    gateway = start_gateway()
    served = counts(upstream)

    def refused() -> None:
        response = raw_request(gateway.port, target)
        assert 400 <= response.status < 500, response.status
        assert response.status != 404

    assert_count_kept(gateway, refused)
    assert served() == 3, "only the three failures reached the upstream"


# -- clients that leave ------------------------------------------------------------------------


def leave_mid_upload(gateway: Gateway, upstream: Upstream) -> bool:
    """POST a body of 1 MB, send 10 bytes, and leave once the upstream has the request.

    False when the gateway answered at once instead (an open breaker's 503).
    """
    served = counts(upstream)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        head = "POST /discovery/upload HTTP/1.1\r\nHost: gw\r\nContent-Length: 1000000\r\n\r\n"
        sock.sendall(head.encode() + b"0123456789")
        wait_until_sync(
            lambda: served() == 1 or answered(sock), 10, 0.02, "the upstream to get the upload"
        )
        if served() == 0:
            assert sock.recv(100).startswith(b"HTTP/1.1 503")
            return False
    gateway.wait_for_log("Client disconnected while sending its body (service=discovery")
    return True


def leave_mid_response(gateway: Gateway, upstream: Upstream) -> bool:
    """GET a response streamed over seconds, read its first bytes, and leave.

    False when the gateway answered 503 (an open breaker) instead.
    """
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(b"GET /discovery/stream/100?delay=0.05 HTTP/1.1\r\nHost: gw\r\n\r\n")
        status = sock.recv(100)
        if status.startswith(b"HTTP/1.1 503"):
            return False
        assert status.startswith(b"HTTP/1.1 200"), status
    gateway.wait_for_log(
        "Client disconnected before the whole response (service=discovery", timeout=15
    )
    return True


def answered(sock: socket.socket) -> bool:
    """Whether the gateway has sent something on `sock` (without reading it)."""
    sock.setblocking(False)
    try:
        return bool(sock.recv(1, socket.MSG_PEEK))
    except BlockingIOError:
        return False
    finally:
        sock.setblocking(True)
        sock.settimeout(10)


LEAVERS = {"mid-upload": leave_mid_upload, "mid-response": leave_mid_response}


@pytest.mark.parametrize("how", LEAVERS)
def test_a_client_that_leaves_does_not_reset_the_failure_count(
    start_gateway: StartGateway, upstream: Upstream, transport: str, how: str
) -> None:
    gateway = start_gateway(env={"UPSTREAM_TRANSPORT": transport})
    assert_count_kept(gateway, lambda: assert_true(LEAVERS[how](gateway, upstream)))


def assert_true(value: bool) -> None:
    assert value


@pytest.mark.parametrize("how", LEAVERS)
def test_a_client_that_leaves_never_closes_a_half_open_breaker(
    start_gateway: StartGateway, upstream: Upstream, how: str
) -> None:
    # The open period outlasts the few requests between the probe's failure and the check that
    # the breaker rejects again, however busy the machine.
    gateway = start_gateway(make_config(upstream.url, failure_threshold=1, timeout_seconds=3))
    fail_discovery(gateway, 1)
    gateway.wait_for_log("(service=discovery, from=closed, to=open")
    # The leaving client is the probe: it is rejected until the open period is over.
    wait_until_sync(
        lambda: LEAVERS[how](gateway, upstream),
        20,
        0.05,
        "a leaving client to be let through as the probe",
    )
    gateway.wait_for_log("(service=discovery, from=open, to=half_open")
    assert "from=half_open, to=closed" not in gateway.output()
    # The permit came back: the next call is a probe, and its failure opens the breaker again.
    assert gateway.get("/discovery/status/500").status_code == 500
    gateway.wait_for_log("(service=discovery, from=half_open, to=open")
    assert gateway.get("/discovery/anything").status_code == 503
    assert "from=half_open, to=closed" not in gateway.output()


# -- root path ---------------------------------------------------------------------------------


class ServerWithArgs(ServerProcess):
    """A uvicorn process like the fixtures' own, with extra command-line arguments."""

    health_path = "/healthz"

    def __init__(
        self, name: str, app: str, env: dict[str, str], logdir: Path, extra: list[str]
    ) -> None:
        super().__init__(name, app, env, logdir, extra_args=extra)


@pytest.fixture
def rooted(tmp_path: Path, upstream: Upstream) -> Iterator[Callable[..., ServerWithArgs]]:
    started: list[ServerWithArgs] = []

    def start(app: str, extra: list[str], health: str) -> ServerWithArgs:
        import yaml

        config = tmp_path / "gateway.yaml"
        config.write_text(yaml.safe_dump(make_config(upstream.url)))
        env = clean_env({"GATEWAY_BREAKER_CONFIG": str(config), "LOG_LEVEL": "debug"})
        server = ServerWithArgs(f"rooted{len(started)}", app, env, tmp_path, extra)
        server.health_path = health
        started.append(server)
        server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()


def test_run_with_root_path_proxies_the_path_below_it(
    rooted: Callable[..., ServerWithArgs], upstream: Upstream
) -> None:
    # Behind a proxy that strips /api: requests arrive without it, root_path says where it was.
    gateway = rooted("examples.gateway:app", ["--root-path", "/api"], "/healthz")
    echo = gateway.get("/discovery/items?x=1").json()
    assert echo["path"] == "/discovery/items"
    assert echo["query"] == "x=1"
    assert gateway.get("/nowhere").status_code == 404
    assert gateway.get("/discovery/status/500").status_code == 500


def test_mounted_under_a_prefix_proxies_the_path_below_it(
    rooted: Callable[..., ServerWithArgs], upstream: Upstream
) -> None:
    gateway = rooted("tests.e2e.mounted_gateway:app", [], "/api/healthz")
    echo = gateway.get("/api/discovery/items").json()
    assert echo["path"] == "/discovery/items"
    assert gateway.get("/api/nowhere").status_code == 404
    assert problem(raw_request(gateway.port, "/api/discovery/../sona/x"), 400)
