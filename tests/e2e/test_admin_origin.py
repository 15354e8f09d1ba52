"""The operator surface next to untrusted upstreams, on the real example gateway under uvicorn:
the admin path never reaches an upstream, an upstream cannot widen a service worker's scope,
and the admin API, dashboard and /metrics can live on a listener of their own."""

from __future__ import annotations

import httpx
import port_for
import pytest

from tests.e2e.conftest import StartGateway, Upstream, counts, make_config
from tests.helpers import wait_until_sync

pytestmark = pytest.mark.e2e

TOKEN = "origin-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def catch_all(upstream: Upstream, **admin: object) -> dict[str, object]:
    config = make_config(upstream.url)
    services = config["circuit_breaker"]["services"]  # type: ignore[index]
    services["everything"] = {"prefix": "/", "upstream": upstream.url}
    config["admin"] = {"token": TOKEN, **admin}
    config["metrics"] = {"enabled": True}
    return config


def test_a_disabled_gateway_never_proxies_the_admin_path(
    start_gateway: StartGateway, upstream: Upstream
) -> None:
    gateway = start_gateway(catch_all(upstream), env={"CIRCUIT_BREAKER_ENABLED": "false"})
    reached = counts(upstream)
    for path in ("/_breakers/breakers", "/_breakers/", "/_breakers", "/_breakers/fleet"):
        answer = gateway.get(path, headers=AUTH)
        assert answer.status_code == 404, path
    assert reached() == 0
    assert gateway.get("/other/thing").status_code == 200  # everything else passes through
    assert reached() == 1


def test_an_upstream_cannot_widen_a_service_workers_scope(
    start_gateway: StartGateway, upstream: Upstream
) -> None:
    gateway = start_gateway()
    answer = gateway.get(
        "/discovery/response-headers", params={"Service-Worker-Allowed": "/", "X-Kept": "yes"}
    )
    assert answer.status_code == 200
    assert answer.headers["x-kept"] == "yes"  # the upstream's other headers pass
    assert "service-worker-allowed" not in answer.headers


def test_the_admin_surface_on_its_own_port(start_gateway: StartGateway, upstream: Upstream) -> None:
    admin_port = port_for.select_random()
    config = catch_all(upstream, port=admin_port)
    config["metrics"] = {"enabled": True, "admin_port": True}
    gateway = start_gateway(config)
    admin = httpx.Client(base_url=f"http://127.0.0.1:{admin_port}", trust_env=False, timeout=10)
    try:
        wait_until_sync(
            lambda: _answers(admin, "/_breakers/breakers"), 10, 0.05, "the admin listener"
        )
        listing = admin.get("/_breakers/breakers", headers=AUTH)
        assert listing.status_code == 200
        assert {b["service"] for b in listing.json()["breakers"]} >= {"discovery", "sona"}
        assert listing.headers["x-content-type-options"] == "nosniff"
        page = admin.get("/_breakers/")
        assert page.status_code == 200
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert admin.get("/metrics").status_code == 200
        assert admin.get("/discovery/x").status_code == 404  # no proxying on the admin port

        reached = counts(upstream)
        for path in ("/_breakers/breakers", "/_breakers/", "/metrics"):
            answer = gateway.get(path, headers=AUTH)
            assert answer.status_code == 404, path  # not served, not proxied either
        assert reached() == 0
    finally:
        admin.close()
    gateway.stop()
    with pytest.raises(httpx.TransportError):  # stopped with the app
        httpx.get(f"http://127.0.0.1:{admin_port}/_breakers/", timeout=2, trust_env=False)


def test_the_admin_port_from_the_environment(
    start_gateway: StartGateway, upstream: Upstream
) -> None:
    admin_port = port_for.select_random()
    gateway = start_gateway(
        catch_all(upstream),
        env={
            "GATEWAY_BREAKER_ADMIN_PORT": str(admin_port),
            "GATEWAY_BREAKER_ADMIN_HOST": "127.0.0.1",
        },
    )
    admin = httpx.Client(base_url=f"http://127.0.0.1:{admin_port}", trust_env=False, timeout=10)
    try:
        wait_until_sync(
            lambda: _answers(admin, "/_breakers/breakers"), 10, 0.05, "the admin listener"
        )
        assert gateway.get("/_breakers/breakers", headers=AUTH).status_code == 404
        assert gateway.get("/metrics").status_code == 200  # metrics stay on the gateway's port
    finally:
        admin.close()


def _answers(client: httpx.Client, path: str) -> bool:
    try:
        return client.get(path, headers=AUTH).status_code == 200
    except httpx.TransportError:
        return False


def test_the_example_gateway_serves_the_admin_surface_on_its_own_port(
    start_gateway: StartGateway,
) -> None:
    admin_port = port_for.select_random()  # in place of examples/config.yaml's 9180
    gateway = start_gateway(
        example_config=True,
        env={"GATEWAY_BREAKER_ADMIN_TOKEN": TOKEN, "GATEWAY_BREAKER_ADMIN_PORT": str(admin_port)},
    )
    admin = httpx.Client(base_url=f"http://127.0.0.1:{admin_port}", trust_env=False, timeout=10)
    try:
        wait_until_sync(
            lambda: _answers(admin, "/_breakers/breakers"), 10, 0.05, "the admin listener"
        )
        assert gateway.get("/_breakers/breakers", headers=AUTH).status_code == 404
        assert gateway.get("/discovery/items").status_code == 200
    finally:
        admin.close()
