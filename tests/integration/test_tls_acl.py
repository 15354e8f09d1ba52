"""TLS with client certificates on real servers (the README's ACL user: test_acl.py)."""

from __future__ import annotations

import logging
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import port_for
import pytest
import redis

from gateway_breaker import CircuitBreakerManager, CircuitOpenError, CircuitState, Config
from tests.conftest import RedisProcess
from tests.helpers import wait_until

pytestmark = pytest.mark.redis
README = Path(__file__).resolve().parents[2] / "README.md"
# The open period outlasts the steps between B seeing it open and B's rejected call.
SERVICES = {"discovery": {"failure_threshold": 3, "timeout_seconds": 2}}


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    d = tmp_path_factory.mktemp("tls")
    ca_key, ca_crt = str(d / "ca.key"), str(d / "ca.crt")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=test-ca", "-keyout", ca_key, "-out", ca_crt)  # fmt: skip
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"))  # fmt: skip
        ext = d / f"{name}.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.crt"),
                "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "1",
                "-extfile", str(ext), "-out", str(d / f"{name}.crt"))  # fmt: skip
    return {p.stem + p.suffix.replace(".", "_"): p for p in d.iterdir()}


@pytest.fixture
def tls_server(tmp_path: Path, certificates: dict[str, Path]) -> Iterator[tuple[RedisProcess, int]]:
    """A redis-server that answers TLS (client certificates required) on its TLS port."""
    tls_port = port_for.select_random()
    server = RedisProcess(
        tmp_path / "redis-tls",
        port_for.select_random(),  # plain port, for the test's own inspection only
        "--tls-port", str(tls_port),
        "--tls-cert-file", str(certificates["server_crt"]),
        "--tls-key-file", str(certificates["server_key"]),
        "--tls-ca-cert-file", str(certificates["ca_crt"]),
        "--tls-auth-clients", "yes",
    )  # fmt: skip
    server.start()
    yield server, tls_port
    server.stop()


def documented_acl() -> str:
    """The ACL line the README gives operators, with its password placeholder."""
    match = re.search(r"ACL SETUSER (gateway .*CHANGE-ME.*)", README.read_text())
    assert match, "README.md must document the ACL line"
    return match.group(1)


async def open_and_close_across_two_instances(config: Config) -> None:
    a = await CircuitBreakerManager.with_redis(config)
    b = await CircuitBreakerManager.with_redis(config)
    try:
        assert a.shared
        assert a._sync is not None
        assert a._sync.connected
        while a.get("discovery").state is not CircuitState.OPEN:
            with pytest.raises(RuntimeError):
                await a.call("discovery", _boom)
        await wait_until(lambda: b.get("discovery").state is CircuitState.OPEN, timeout=3)
        with pytest.raises(CircuitOpenError):
            await b.call("discovery", lambda: "ok")
        await wait_until(lambda: b.get("discovery").retry_after() == 0, timeout=3)
        assert await b.call("discovery", lambda: "probe") == "probe"  # takes the probe lease
        await wait_until(lambda: a.get("discovery").state is CircuitState.CLOSED, timeout=3)
    finally:
        await a.aclose()
        await b.aclose()


def _boom() -> None:
    raise RuntimeError("upstream failed")


async def test_tls_with_client_certificates(
    tls_server: tuple[RedisProcess, int], certificates: dict[str, Path]
) -> None:
    server, tls_port = tls_server
    config = Config(
        redis={
            "url": f"rediss://127.0.0.1:{tls_port}/0",
            "ssl_ca_certs": str(certificates["ca_crt"]),
            "ssl_certfile": str(certificates["client_crt"]),
            "ssl_keyfile": str(certificates["client_key"]),
        },
        circuit_breaker={"services": SERVICES},
    )
    await open_and_close_across_two_instances(config)
    stored = redis.Redis(port=server.port).get("circuit_breaker:discovery:state")
    assert stored is not None
    assert b'"state":"closed"' in stored


async def test_tls_without_the_client_certificate_falls_back_to_memory(
    tls_server: tuple[RedisProcess, int],
    certificates: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, tls_port = tls_server
    config = Config(
        redis={
            "url": f"rediss://127.0.0.1:{tls_port}/0",
            "ssl_ca_certs": str(certificates["ca_crt"]),
        },
        circuit_breaker={"services": SERVICES},
    )
    with caplog.at_level(logging.WARNING, logger="gateway_breaker"):
        manager = await CircuitBreakerManager.with_redis(config)
    try:
        assert "falling back to in-memory only" in caplog.text
        assert await manager.call("discovery", lambda: "ok") == "ok"
    finally:
        await manager.aclose()
