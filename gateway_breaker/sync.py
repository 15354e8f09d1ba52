"""StateSync: keeps the manager's breakers and the store in agreement, in the background.

Local transitions mark a service dirty (no I/O on the request path); one task writes dirty
services with compare-and-set, re-reads every service's stored state periodically and after a
reconnect, and adopts newer states that other instances wrote. The store is the fleet's truth:
a breaker with no unsent change mirrors it; a write that lost a race adopts the winner.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from gateway_breaker.breaker import BreakerSnapshot, CircuitBreaker, CircuitState, Permit
from gateway_breaker.config import RedisSettings
from gateway_breaker.errors import StoreError
from gateway_breaker.store.base import StateStore
from gateway_breaker.views import FleetView, TransitionEvent

if TYPE_CHECKING:
    from gateway_breaker.manager import CircuitBreakerManager

logger = logging.getLogger("gateway_breaker")

FLUSH_TIMEOUT_SECONDS = 2.0
TASK_STOP_TIMEOUT_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 5.0
# A service's first call waits at most this long for the fleet's state of it.
FIRST_LOAD_TIMEOUT_SECONDS = 0.25
# The one round trip a request may wait on: taking a fleet-wide probe slot.
PROBE_LEASE_TIMEOUT_SECONDS = 0.25
# An operator's command waits at most this long for its write to reach Redis.
COMMAND_TIMEOUT_SECONDS = 2.0
# Transitions kept for the history while they wait for their write (Redis down, say).
PENDING_HISTORY = 50


class StateSync:
    """The background half of a Redis-backed manager: writes, re-reads, announcements, leases.

    Two tasks: one writes dirty services and re-reads all of them every `sync_interval_seconds`
    (reconnecting with backoff while the store is down); one applies other instances'
    announcements as they arrive. Only `acquire_probe` is awaited by a request, bounded.
    """

    def __init__(
        self,
        store: StateStore,
        manager: CircuitBreakerManager,
        settings: RedisSettings,
        *,
        register: bool = True,
    ) -> None:
        self.store = store
        self._manager = manager
        self._register = register
        self._interval = settings.sync_interval_seconds
        self.errors: dict[str, int] = {}  # failed store operations by kind
        self._pending_history: dict[str, list[TransitionEvent]] = {}
        self._policies_to_load: set[str] = set()
        self._dirty: set[str] = set()
        self._to_load: set[str] = set()
        self._writing: set[str] = set()  # services whose write is in flight
        self._leases_to_free: set[tuple[str, str]] = set()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._tokens = itertools.count()
        self._instance = manager.instance_id
        self.connected = False
        self._outage_logged = False
        self._closing = False

    # -- called from the request path: no I/O, O(1) ----------------------------------------

    def mark_dirty(self, service: str) -> None:
        self._dirty.add(service)
        self._wake.set()

    def track(self, service: str) -> None:
        self._to_load.add(service)
        self._wake.set()

    def free_probe(self, service: str, token: str) -> None:
        self._leases_to_free.add((service, token))
        self._wake.set()

    def queue_history(self, service: str, event: TransitionEvent) -> None:
        """Keep a local transition for the history; it rides in the service's next write."""
        pending = self._pending_history.setdefault(service, [])
        pending.append(event)
        if len(pending) > PENDING_HISTORY:
            del pending[0]

    # -- operators' commands (awaited by the admin API and the CLI, never by a request) -----

    async def write_now(self, service: str) -> None:
        """Wait until `service`'s local change is in Redis (bounded). Raises StoreError when
        Redis is unreachable: the change stays applied here and is written on reconnect."""
        self._wake.set()
        deadline = time.monotonic() + COMMAND_TIMEOUT_SECONDS
        while self._unsent(service):
            if not self.connected or time.monotonic() > deadline:
                raise StoreError(
                    "Redis unreachable: applied on this instance only; it reaches the fleet"
                    " when Redis returns",
                    "command",
                )
            await self._sleep(0.002)

    async def store_policy(self, service: str, fields: dict[str, object] | None) -> None:
        """Store (None: delete) a live policy override and announce it."""
        if not self.connected:
            raise StoreError("Redis unreachable: the policy change was not applied", "policy")
        try:
            await self.store.write_policy(service, fields, self._instance)
        except StoreError as exc:
            self._lost(exc)
            raise

    async def history(self, service: str, limit: int) -> list[TransitionEvent]:
        try:
            return await self.store.history(service, limit)
        except StoreError as exc:
            self._lost(exc)
            raise

    async def fleet(self) -> FleetView:
        if not self.connected:
            return FleetView(instances=[self._manager.instance_view()], store={})
        try:
            instances = await self.store.instances()
            names = self._manager.services()
            stored = await self.store.load(names)
        except StoreError as exc:
            self._lost(exc)
            raise
        return FleetView(
            instances=instances,
            store={name: (_effective(snap), snap.version) for name, snap in stored.items()},
        )

    # -- the one bounded round trip a request may take -------------------------------------

    async def acquire_probe(self, breaker: CircuitBreaker, permit: Permit) -> bool:
        """Take a fleet-wide probe slot for `permit`. False: another instance probes.

        Without Redis (or when it does not answer in time) the breaker's own per-instance
        limit is all there is, and the probe goes ahead.
        """
        if not self.connected:
            return True
        policy = breaker.policy
        token = f"{self._instance}:{next(self._tokens)}"
        try:
            wait = await self.store.acquire_probe(
                breaker.name,
                token,
                policy.half_open_max_calls,
                policy.probe_lease_seconds,
                PROBE_LEASE_TIMEOUT_SECONDS,
            )
        except StoreError as exc:
            # Slow or gone, the request decides alone; outages are the background task's to find.
            logger.debug("Probe lease not granted in time (service=%s): %s", breaker.name, exc)
            return True
        if wait == 0:
            permit.lease = token
            if permit.generation == breaker.generation:
                return True
            breaker.refuse(permit)  # the fleet moved on while we asked; frees the slot
            return False
        breaker.refuse(permit)
        breaker.hold_probes(wait)
        return False

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, services: list[str]) -> None:
        try:
            await self.store.connect()
            self.connected = True
            logger.debug(
                "Circuit breaker Redis persistence enabled (url=%s)", self.store.describe()
            )
            await self._load_policies(services)
            await self._reconcile(services)
        except StoreError as exc:
            self._lost(exc)
        self._tasks = [
            asyncio.create_task(self._run(), name="gateway-breaker-sync"),
            asyncio.create_task(self._listen(), name="gateway-breaker-events"),
        ]

    async def aclose(self) -> None:
        self._closing = True
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
                    ",".join(sorted(self._dirty)),
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

    async def load_first(self, service: str) -> None:
        """Fetch one service's stored state now (its first use), bounded; never raises."""
        if not self.connected:
            return
        try:
            async with asyncio.timeout(FIRST_LOAD_TIMEOUT_SECONDS):
                await self._reconcile([service])
        except TimeoutError:
            self.track(service)  # the background task fetches it
        except StoreError as exc:
            self._lost(exc)

    # -- the background task ---------------------------------------------------------------

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
                    await self._reconcile(names)
                if self._dirty:
                    await self._flush()
                while self._leases_to_free:
                    service, token = self._leases_to_free.pop()
                    await self.store.release_probe(service, token)
                if self._policies_to_load:
                    names, self._policies_to_load = list(self._policies_to_load), set()
                    await self._load_policies(names)
                if time.monotonic() >= next_sync:
                    next_sync = time.monotonic() + self._interval
                    for breaker in self._manager.breakers().values():
                        breaker.expire_manual()  # a timed mode ends even with no traffic
                    await self._reconcile(list(self._manager.breakers()))
                    await self._load_policies(list(self._manager.breakers()))
                    if self._register:
                        await self.store.register(
                            self._manager.instance_view(), ttl=max(5.0, 3 * self._interval)
                        )
            except StoreError as exc:
                self._lost(exc)

    async def _listen(self) -> None:
        """Apply other instances' transitions as they are announced (milliseconds)."""
        backoff = 0.05
        while not self._closing:
            if not self.connected:
                await self._sleep(0.05)
                continue
            try:
                async for event in self.store.events():
                    if event is None:
                        # (Re)subscribed: what was announced while cut off is lost; re-read.
                        backoff = 0.05
                        self._to_load.update(self._manager.breakers())
                        self._policies_to_load.update(self._manager.breakers())
                        self._wake.set()
                    elif event[1] is None:
                        if self._manager.find(event[0]) is not None:
                            self._policies_to_load.add(event[0])  # a live policy change
                            self._wake.set()
                    else:
                        self._apply(event[0], event[1])
            except StoreError as exc:
                logger.debug("Circuit breaker event subscription lost: %s", exc)
            await self._sleep(backoff * random.uniform(0.5, 1.5))
            backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

    def _apply(self, service: str, snapshot: BreakerSnapshot) -> None:
        breaker = self._manager.find(service)
        if breaker is None or snapshot.version <= breaker.version:
            return  # not ours to care about, or older than what we know
        if self._unsent(service) and _knows_more(breaker, snapshot):
            breaker.version = snapshot.version
            self.mark_dirty(service)  # our change goes on top of it
            return
        self._dirty.discard(service)  # a newer fleet state supersedes our unsent change
        self._adopt(breaker, snapshot)

    def _unsent(self, service: str) -> bool:
        """Whether a local change of `service` is not in the store yet (queued or in flight)."""
        return service in self._dirty or service in self._writing

    async def _sleep(self, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):
                await asyncio.Event().wait()
        except TimeoutError:
            pass

    async def _reconnect(self) -> bool:
        try:
            await self.store.connect()
            self.connected = True
            # Whatever happened meanwhile: adopt what others stored, write what we changed.
            await self._load_policies(list(self._manager.breakers()))
            await self._reconcile(list(self._manager.breakers()))
        except StoreError as exc:
            self.connected = False
            logger.debug("Redis still unreachable for circuit breaker state: %s", exc)
            return False
        if self._outage_logged:
            logger.warning(
                "Reconnected to Redis for circuit breaker persistence (url=%s); state re-synced",
                self.store.describe(),
            )
            self._outage_logged = False
        return True

    def _lost(self, exc: StoreError, service: str | None = None) -> None:
        self.errors[exc.operation] = self.errors.get(exc.operation, 0) + 1
        self.connected = False
        self._wake.set()
        if self._outage_logged:
            return
        self._outage_logged = True
        if service is not None:
            logger.error(
                "Failed to persist circuit breaker state to Redis (service=%s, error=%s)",
                service,
                exc,
            )
        logger.warning(
            "Failed to connect to Redis for circuit breaker persistence, falling back to"
            " in-memory only (url=%s, error=%s)",
            self.store.describe(),
            exc,
        )

    # -- agreement with the store ----------------------------------------------------------

    async def _reconcile(self, services: Iterable[str]) -> None:
        breakers = self._manager.breakers()
        names = [s for s in services if s in breakers]
        stored = await self.store.load(names)
        for name in names:
            if name in self._dirty:
                continue  # our write decides, by compare-and-set
            breaker = breakers[name]
            snapshot = stored.get(name)
            if snapshot is None:
                if breaker.state is not CircuitState.CLOSED:
                    self.mark_dirty(name)  # the key expired or Redis lost it: put ours back
            elif snapshot.version != breaker.version:
                self._adopt(breaker, snapshot)
        if self._dirty:
            await self._flush()

    async def _load_policies(self, services: list[str]) -> None:
        stored = await self.store.load_policies(services)
        for name in services:
            self._manager.apply_policy(name, stored.get(name))

    async def _flush(self) -> None:
        breakers = self._manager.breakers()
        while self._dirty:
            name = self._dirty.pop()
            breaker = breakers.get(name)
            if breaker is None:
                continue
            snapshot = breaker.snapshot()
            events = self._pending_history.pop(name, [])
            self._writing.add(name)
            try:
                result = await self.store.write(name, snapshot, events)
            except BaseException as exc:
                self._dirty.add(name)
                self._pending_history[name] = events + self._pending_history.get(name, [])
                if isinstance(exc, StoreError):
                    self._lost(exc, name)
                raise
            finally:
                self._writing.discard(name)
            stored = result.stored
            if stored is None:
                continue
            if result.accepted:
                # An announcement of a still newer state may have arrived meanwhile.
                breaker.version = max(breaker.version, stored.version)
                logger.debug(
                    "Persisted circuit breaker state to Redis (service=%s, state=%s)",
                    name,
                    snapshot.state.value,
                )
            elif stored.version < breaker.version:
                continue  # a newer state was applied while we wrote; nothing to adopt
            elif _knows_more(breaker, stored):
                breaker.version = stored.version
                self._pending_history[name] = events + self._pending_history.get(name, [])
                self._dirty.add(name)  # write again, on top of it
            else:
                # Another instance wrote a newer state first: theirs is the fleet's.
                self._dirty.discard(name)
                self._adopt(breaker, stored)

    def _adopt(self, breaker: CircuitBreaker, snapshot: BreakerSnapshot) -> None:
        # Our unsent transitions lost to the fleet's: they never happened for the fleet.
        self._pending_history.pop(breaker.name, None)
        if breaker.restore(snapshot):
            self._manager.adopted(breaker)
        logger.debug(
            "Restored circuit breaker state from Redis (service=%s, state=%s, failure_count=%d)",
            breaker.name,
            snapshot.state.value,
            snapshot.failure_count,
        )


def _effective(snapshot: BreakerSnapshot) -> str:
    return snapshot.state.value if snapshot.manual is None else snapshot.manual.mode


def _knows_more(breaker: CircuitBreaker, snapshot: BreakerSnapshot) -> bool:
    """Whether the breaker's own state is newer information than a stored half_open.

    Every instance sees an open period end and goes half-open on its own, so a stored half_open
    of the period this breaker probed carries nothing new; the probe's outcome (closed, or open
    again) does, and must not be lost to it.
    """
    if snapshot.state is not CircuitState.HALF_OPEN or snapshot.opened_at is None:
        return False
    if breaker.state is CircuitState.HALF_OPEN or breaker.probed_period is None:
        return False
    tolerance = min(0.1, breaker.policy.timeout_seconds / 2)
    return abs(snapshot.opened_at - breaker.probed_period) <= tolerance
