"""Property: the fleet's counts are every live instance's current counts, each once.

Instances are modelled by their true counts; each operation is a failure, a success, a flush
(a report that reaches Redis), a lost flush (a report that never arrives: the connection
broke), a repeated flush (a retry after a reconnect) or a death (the instance stops; its last
contribution stays behind, older than the window). The real script on a real redis-server is
the system under test: after every live instance flushes once more, the sums it decides on
must equal the sums of the live instances' true counts, whatever happened before.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway_breaker.config import RedisSettings
from gateway_breaker.store.base import Evidence, EvidenceResult
from gateway_breaker.store.redis import RedisStateStore
from tests.conftest import RedisServer

pytestmark = pytest.mark.redis

WINDOW = 10.0
INSTANCES = 4
OPS = st.lists(
    st.tuples(
        st.sampled_from(["fail", "succeed", "flush", "lost", "again", "die"]),
        st.integers(0, INSTANCES - 1),
    ),
    max_size=40,
)


@dataclass
class Instance:
    run: int = 0
    calls: int = 0
    failures: int = 0
    dead: bool = False

    def apply(self, op: str) -> None:
        """What the instance's own counts do on `op` (flushes change nothing here)."""
        if op == "fail":
            self.run, self.calls, self.failures = self.run + 1, self.calls + 1, self.failures + 1
        elif op == "succeed":
            self.run, self.calls = 0, self.calls + 1
        elif op == "die":
            self.dead = True

    def evidence(self, name: str) -> Evidence:
        # Thresholds out of reach: the property is about counting, not opening.
        return Evidence(name, self.run, self.calls, self.failures, 0, WINDOW, 10**9, 10**9, 1, 1)


async def play(url: str, prefix: str, ops: list[tuple[str, int]]) -> EvidenceResult | None:
    store = RedisStateStore(RedisSettings(url=url, key_prefix=prefix))
    await store.connect()
    instances = [Instance() for _ in range(INSTANCES)]
    evidence_key = store.key("svc", "evidence")
    raw = redis.Redis.from_url(url)
    try:
        for op, i in ops:
            inst = instances[i]
            if inst.dead:
                continue
            if op in ("flush", "again"):
                for _ in range(2 if op == "again" else 1):
                    await store.report_evidence("svc", inst.evidence(f"i{i}"))
            elif op == "die":
                # What a dead instance leaves: its last contribution, now older than the window.
                value = raw.hget(evidence_key, f"i{i}")
                if value is not None:
                    r, c, f, ts = (int(x) for x in value.split(b","))
                    stale = f"{r},{c},{f},{ts - round(WINDOW * 1000) - 1}"
                    raw.hset(evidence_key, f"i{i}", stale)
            inst.apply(op)
        result = None
        for i, inst in enumerate(instances):
            if not inst.dead:
                result = await store.report_evidence("svc", inst.evidence(f"i{i}"))
        return result
    finally:
        raw.close()
        await store.aclose()


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=OPS)
def test_fleet_counts_are_the_live_instances_counts_once(
    redis_shared: RedisServer, ops: list[tuple[str, int]]
) -> None:
    prefix = f"prop_{uuid.uuid4().hex[:10]}"
    result = asyncio.run(play(redis_shared.url, prefix, ops))
    instances = [Instance() for _ in range(INSTANCES)]
    for op, i in ops:  # the same model, replayed for the expected sums
        if not instances[i].dead:
            instances[i].apply(op)
    live = [inst for inst in instances if not inst.dead]
    if result is None:
        assert not live
        return
    failing = [inst for inst in live if inst.run or inst.failures]
    assert result.outcome == "counted"
    assert result.fleet_run == sum(inst.run for inst in failing)
    # Every live instance's calls, failing or not: the adaptive mode's n is the fleet's.
    assert result.fleet_calls == sum(inst.calls for inst in live)
    assert result.fleet_failures == sum(inst.failures for inst in failing)
    assert result.failing_instances == len(failing)
