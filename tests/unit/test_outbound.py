"""BreakerTransport around an in-process httpx.MockTransport, and the origin router."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway_breaker import (
    BreakerTransport,
    CircuitBreakerManager,
    CircuitOpenError,
    CircuitOpenTransportError,
    CircuitState,
    route_by_origin,
)
from gateway_breaker.outbound import route_upstreams
from tests.helpers import FakeClock
from tests.unit.support import make_config

SERVICE = "rates"


@pytest.fixture
def manager(clock: FakeClock) -> CircuitBreakerManager:
    config = make_config(
        {
            SERVICE: {"failure_threshold": 3, "timeout_seconds": 10, "upstream": "http://rates"},
            "auth": {"upstream": "https://auth.internal:8443/v1"},
            "auth_admin": {"upstream": "https://auth.internal:8443/v1/admin"},
        }
    )
    return CircuitBreakerManager(config, clock=clock)


def client(manager: CircuitBreakerManager, answer: httpx.MockTransport) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=BreakerTransport(manager, service=SERVICE, transport=answer))


async def test_failure_statuses_open_then_requests_are_not_sent(
    manager: CircuitBreakerManager,
) -> None:
    sent: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request.url.path)
        return httpx.Response(503 if request.url.path == "/down" else 404)

    async with client(manager, httpx.MockTransport(answer)) as http:
        assert (await http.get("http://rates/missing")).status_code == 404  # 4xx: a success
        for _ in range(3):
            assert (await http.get("http://rates/down")).status_code == 503
        assert manager.get(SERVICE).state is CircuitState.OPEN
        sent.clear()
        with pytest.raises(httpx.TransportError) as caught:
            await http.get("http://rates/x")
    error = caught.value
    assert isinstance(error, CircuitOpenError)
    assert isinstance(error, CircuitOpenTransportError)
    assert error.service == SERVICE
    assert 0 < error.retry_after <= 10
    assert error.request.url == "http://rates/x"
    assert sent == []


async def test_transport_errors_are_failures(manager: CircuitBreakerManager) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectTimeout("slow", request=request)

    async with client(manager, httpx.MockTransport(answer)) as http:
        for _ in range(3):
            with pytest.raises(httpx.ConnectTimeout):
                await http.get("http://rates/")
    assert manager.get(SERVICE).state is CircuitState.OPEN


async def test_cancelled_probe_counts_nothing_and_frees_its_slot(
    manager: CircuitBreakerManager, clock: FakeClock
) -> None:
    breaker = manager.get(SERVICE)
    breaker.open_locally("test")
    clock.advance(11)
    arrived = asyncio.Event()
    hold = True

    async def answer(request: httpx.Request) -> httpx.Response:
        arrived.set()
        if hold:
            await asyncio.sleep(60)
        return httpx.Response(200)

    async with client(manager, httpx.MockTransport(answer)) as http:
        task = asyncio.create_task(http.get("http://rates/"))
        await arrived.wait()
        assert breaker.state is CircuitState.HALF_OPEN
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert breaker.state is CircuitState.HALF_OPEN
        assert breaker.calls_ignored == 1
        hold = False
        assert (await http.get("http://rates/")).status_code == 200  # the slot was free
    assert breaker.state is CircuitState.CLOSED


async def test_unrouted_requests_pass_untouched(manager: CircuitBreakerManager) -> None:
    transport = BreakerTransport(
        manager,
        service=route_by_origin(manager),
        transport=httpx.MockTransport(lambda request: httpx.Response(500)),
    )
    async with httpx.AsyncClient(transport=transport) as http:
        for _ in range(5):
            assert (await http.get("http://elsewhere/")).status_code == 500
    assert manager.find(SERVICE) is None
    assert manager.find("auth") is None


def test_service_must_be_a_name_or_a_callable(manager: CircuitBreakerManager) -> None:
    with pytest.raises(TypeError, match="service"):
        BreakerTransport(manager, service=3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("url", "service"),
    [
        ("http://rates/any/path", SERVICE),
        ("http://rates:80/", SERVICE),
        ("HTTP://RATES/", SERVICE),
        ("https://rates/", None),  # another scheme, another origin
        ("http://rates:8080/", None),  # another port
        ("https://auth.internal:8443/v1/token", "auth"),
        ("https://auth.internal:8443/v1", "auth"),
        ("https://auth.internal:8443/v1/admin/users", "auth_admin"),  # the longer path wins
        ("https://auth.internal:8443/v1/administrators", "auth"),  # segment boundary
        ("https://auth.internal:8443/v2", None),  # no upstream path is a prefix
        ("https://auth.internal/v1", None),  # default port 443, not 8443
    ],
)
def test_origin_router(manager: CircuitBreakerManager, url: str, service: str | None) -> None:
    route = route_by_origin(manager)
    assert route(httpx.Request("GET", url)) == service


def test_origin_router_default_ports() -> None:
    route = route_upstreams([("a", "https://a.example:443"), ("b", "http://b.example:80/")])
    assert route(httpx.Request("GET", "https://a.example/x")) == "a"
    assert route(httpx.Request("GET", "http://b.example:80/x")) == "b"


async def test_slow_call_rule_measures_to_the_response_headers(clock: FakeClock) -> None:
    config = make_config({SERVICE: {"failure_threshold": 2, "slow_call_seconds": 1.0}})
    manager = CircuitBreakerManager(config, clock=clock)

    def answer(request: httpx.Request) -> httpx.Response:
        clock.advance(2.0 if request.url.path == "/slow" else 0.1)
        return httpx.Response(200)

    async with client(manager, httpx.MockTransport(answer)) as http:
        await http.get("http://rates/fast")
        for _ in range(2):
            assert (await http.get("http://rates/slow")).status_code == 200
    breaker = manager.get(SERVICE)
    assert breaker.calls_slow == 2
    assert breaker.state is CircuitState.OPEN


async def test_manual_modes_apply_as_in_the_middleware(manager: CircuitBreakerManager) -> None:
    sent: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request.url.path)
        return httpx.Response(500)

    breaker = manager.get(SERVICE)
    async with client(manager, httpx.MockTransport(answer)) as http:
        await manager.set_manual(SERVICE, "forced_open")
        with pytest.raises(CircuitOpenError):
            await http.get("http://rates/forced")
        await manager.set_manual(SERVICE, "disabled")
        for _ in range(5):
            assert (await http.get("http://rates/disabled")).status_code == 500
        assert breaker.failure_count == 0  # disabled: let through, counted for nothing
        await manager.set_manual(SERVICE, "metrics_only")
        for _ in range(5):
            assert (await http.get("http://rates/shadow")).status_code == 500
        assert breaker.state is CircuitState.OPEN  # the state machine ran ...
    assert sent == ["/disabled"] * 5 + ["/shadow"] * 5  # ... and nothing was rejected


_SEGMENTS = st.sampled_from(["a", "b", "ab", "v1"])
_PATHS = st.lists(_SEGMENTS, max_size=3).map(lambda parts: "".join(f"/{p}" for p in parts))
_ORIGINS = st.sampled_from(["http://one", "http://one:8080", "https://one", "http://two"])


@given(
    upstreams=st.dictionaries(
        st.sampled_from(["s1", "s2", "s3", "s4"]), st.tuples(_ORIGINS, _PATHS), max_size=4
    ),
    origin=_ORIGINS,
    path=_PATHS,
)
def test_origin_router_picks_the_longest_matching_upstream_path(
    upstreams: dict[str, tuple[str, str]], origin: str, path: str
) -> None:
    route = route_upstreams((name, base + prefix) for name, (base, prefix) in upstreams.items())
    chosen = route(httpx.Request("GET", f"{origin}{path}"))
    # The oracle: same origin, upstream path a segment prefix of the request path, longest.
    matching = [
        (len(prefix), name)
        for name, (base, prefix) in upstreams.items()
        if base == origin and (path == prefix or path.startswith(prefix + "/"))
    ]
    if not matching:
        assert chosen is None
    else:
        longest = max(length for length, _ in matching)
        assert chosen in {name for length, name in matching if length == longest}
