"""Schemathesis fuzzes the admin API of a running example gateway from its own OpenAPI document.

Valid and invalid requests (wrong types, out-of-range values, unknown fields, missing auth) are
generated for every operation; the checks: never a 5xx, statuses, content types, headers and
bodies as documented, invalid data rejected, auth not ignored. `/events` streams forever, so it
is left to the tests that read it. The gateway shares a real redis-server, so every command goes
through the fleet's compare-and-set path.
"""

from __future__ import annotations

import uuid

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from tests.conftest import RedisServer
from tests.e2e.conftest import StartGateway, Upstream, make_config

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

TOKEN = "fuzz-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLES = 40


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_the_admin_api_holds_to_its_openapi_document(
    start_gateway: StartGateway, upstream: Upstream, redis_shared: RedisServer, mode: GenerationMode
) -> None:
    config = make_config(upstream.url)
    config["redis"] = {"key_prefix": f"fuzz_{uuid.uuid4().hex[:8]}"}
    gateway = start_gateway(
        config, redis_url=redis_shared.url, env={"GATEWAY_BREAKER_ADMIN_TOKEN": TOKEN}
    )
    base_url = f"{gateway.url}/_breakers"
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    session = requests.Session()
    session.trust_env = False  # loopback only: never a proxy from the environment
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 9
    for operation in operations:
        if operation.path == "/events":
            continue

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def fuzz(case: schemathesis.Case) -> None:
            case.call_and_validate(base_url=base_url, session=session, headers=AUTH, timeout=10)

        fuzz()
    # Whatever it sent, the gateway still answers and never logged its token.
    assert gateway.get("/healthz").status_code == 200
    assert TOKEN not in gateway.output()
