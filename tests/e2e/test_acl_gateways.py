"""Two example gateways under the README's least-privilege ACL user, created exactly as written."""

from __future__ import annotations

import pytest

from tests.conftest import RedisServer
from tests.e2e.conftest import StartGateway, Upstream, make_config
from tests.helpers import wait_until_sync
from tests.integration.test_acl import create_documented_user

pytestmark = [pytest.mark.e2e, pytest.mark.redis]
PERMISSION_WORDS = ("noperm", "no permissions", "permission")


def test_two_gateways_under_the_readme_user_count_as_one_fleet(
    redis_server: RedisServer, start_gateway: StartGateway, upstream: Upstream
) -> None:
    password = create_documented_user(redis_server)
    admin = redis_server.client()
    admin.acl_log_reset()
    url = f"redis://gateway:{password}@127.0.0.1:{redis_server.port}/0"
    # Threshold 12, error-rate rule off: only the fleet's count of 6 + 6 can open it.
    policy = {"failure_threshold": 12, "min_calls": 1_000_000, "timeout_seconds": 60}
    config = make_config(upstream.url, **policy)
    a, b = (start_gateway(config, redis_url=url) for _ in range(2))
    wait_until_sync(
        lambda: admin.zcard("circuit_breaker:instances") == 2,
        timeout=15,
        message="both gateways registered",
    )
    for gateway in (a, b):
        for _ in range(6):
            assert gateway.get("/discovery/status/500").status_code == 500
    # Counting alone, neither gateway would ever reach 12: both reject only on the fleet's count.
    for gateway in (a, b):
        wait_until_sync(
            lambda g=gateway: g.get("/discovery/status/200").status_code == 503,
            timeout=10,
            message=f"{gateway.name} to reject on the fleet's count",
        )
    stored = admin.get("circuit_breaker:discovery:state")
    assert stored is not None
    assert b'"state":"open"' in stored
    assert admin.xlen("circuit_breaker:discovery:history") >= 1
    # Redis refused nothing, and neither gateway fell back to memory or logged a refusal.
    assert admin.acl_log() == []
    for gateway in (a, b):
        output = gateway.output().lower()
        assert "falling back to in-memory" not in output
        assert not [w for w in PERMISSION_WORDS if w in output], gateway.output()[-3000:]
        assert password not in gateway.output()
