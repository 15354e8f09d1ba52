"""StateSync: keeps the manager's breakers and the store in agreement, in the background.

Local transitions mark a service dirty (no I/O on the request path); one task writes dirty
services with compare-and-set, re-reads every service's stored state periodically and after a
reconnect, and adopts newer states that other instances wrote. The store is the fleet's truth:
a breaker with no unsent change mirrors it; a write that lost a race adopts the winner.

Cost at rest, per instance and `sync_interval_seconds`: the registry's heartbeat and the
changes' slow re-read, a fixed number of commands whatever S (docs/scale.md); Redis's cost is
O(N). Startup and the re-read after a fault read every service once: O(S) keys in a few round
trips (one per node on a Cluster, by the client's pipelines).
"""

from __future__ import annotations

import asyncio
import random
import time

from gateway_breaker.errors import StoreError
from gateway_breaker.sync.base import (
    FLUSH_TIMEOUT_SECONDS,
    MAX_BACKOFF_SECONDS,
    TASK_STOP_TIMEOUT_SECONDS,
    logger,
    named,
)
from gateway_breaker.sync.evidence import FleetEvidence
from gateway_breaker.sync.leases import Leases


class StateSync(FleetEvidence, Leases):
    """The background half of a Redis-backed manager: writes, re-reads, announcements, leases.

    Two tasks: one writes dirty services, re-reads a few of them every `sync_interval_seconds`
    and all of them after a fault (reconnecting with backoff while the store is down); one
    applies other instances' announcements and Redis's invalidations as they arrive. Only
    `acquire_probe` is awaited by a request, bounded.
    """

    async def start(self, services: list[str]) -> None:
        try:
            await self.store.connect()
            self.connected = True
            logger.debug(
                "Circuit breaker Redis persistence enabled (url=%s)", self.store.describe()
            )
            await self._load_policies(services)
            await self._reconcile(services)
            self._set_fleet(True)
            if self._register:
                await self._register_instance()
        except StoreError as exc:
            self._lost(exc)
        self._tasks = [
            asyncio.create_task(self._run(), name="gateway-breaker-sync"),
            asyncio.create_task(self._listen(), name="gateway-breaker-events"),
        ]

    async def aclose(self) -> None:
        self._closing = True
        if self._evidence_timer is not None:
            self._evidence_timer.cancel()
            self._evidence_timer = None
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        # Bounded: a client library that loses a cancellation must not hang the shutdown.
        pending: set[asyncio.Task[None]] = set()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=TASK_STOP_TIMEOUT_SECONDS)
        if self.connected and self._dirty:
            try:
                async with asyncio.timeout(FLUSH_TIMEOUT_SECONDS):
                    await self._flush()
            except (StoreError, TimeoutError) as exc:
                logger.error(
                    "Failed to persist circuit breaker state to Redis (service=%s, error=%s)",
                    named(sorted(self._dirty)),
                    exc,
                )
        try:
            async with asyncio.timeout(FLUSH_TIMEOUT_SECONDS):
                await self.store.aclose()
        except TimeoutError:
            logger.warning(
                "Closing the Redis connections timed out (url=%s)", self.store.describe()
            )
        if pending:
            # Closing the connections ends what the cancellation did not.
            _, pending = await asyncio.wait(pending, timeout=TASK_STOP_TIMEOUT_SECONDS)
            for task in pending:
                logger.warning("Circuit breaker background task did not stop: %s", task.get_name())

    async def _run(self) -> None:
        backoff = 0.1
        next_sync = time.monotonic() + self._interval
        while not self._closing:
            if not self.connected:
                if not await self._reconnect():
                    await self._sleep(backoff * random.uniform(0.5, 1.5))
                    backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
                    continue
                backoff = 0.1
                next_sync = time.monotonic() + self._interval
            try:
                async with asyncio.timeout(max(0.0, next_sync - time.monotonic())):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                if self._to_load:
                    names, self._to_load = list(self._to_load), set()
                    after_outage, self._resubscribed = self._resubscribed, False
                    await self._reconcile(names, after_outage=after_outage)
                if self._dirty:
                    await self._flush()
                if self._evidence:
                    now = time.monotonic()
                    urgent = self._urgent and now >= self._urgent_next
                    if urgent or now >= self._evidence_next:
                        await self._send_evidence()
                    elif self._evidence_timer is None:
                        self._schedule_evidence()
                while self._leases_to_free:
                    service, token = self._leases_to_free.pop()
                    await self.store.release_probe(service, token)
                if self._policies_to_load:
                    names, self._policies_to_load = list(self._policies_to_load), set()
                    await self._load_policies(names)
                if time.monotonic() >= next_sync:
                    next_sync = time.monotonic() + self._interval
                    self._expire_manual()
                    await self._resweep(self._sweep())
                    if self._register:
                        await self._register_instance()
            except StoreError as exc:
                self._lost(exc)

    async def _reconnect(self) -> bool:
        try:
            await self.store.connect()
            self.connected = True
            # Whatever happened meanwhile: adopt what others stored, write what we changed.
            await self._load_policies(list(self._manager.breakers()))
            await self._reconcile(list(self._manager.breakers()), after_outage=True)
        except StoreError as exc:
            self.connected = False
            logger.debug("Redis still unreachable for circuit breaker state: %s", exc)
            return False
        self._set_fleet(True)
        for name, breaker in self._manager.breakers().items():
            # Our counts of the outage may not be in Redis (it may even have restarted).
            if breaker.fleet_counting and (breaker.failure_count or breaker.window_counts()[1]):
                self.mark_evidence(name)
        if self._outage_logged:
            logger.warning(
                "Reconnected to Redis for circuit breaker persistence (url=%s); state re-synced",
                self.store.describe(),
            )
            self._outage_logged = False
        return True
