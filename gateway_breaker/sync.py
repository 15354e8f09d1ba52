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
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING

from gateway_breaker.breaker import BreakerSnapshot, CircuitBreaker, CircuitState, Permit
from gateway_breaker.config import RedisSettings
from gateway_breaker.errors import StoreError
from gateway_breaker.store.base import StateStore

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
# While another instance holds the probe slots, ask again after at most this long.
PROBE_RECHECK_SECONDS = 0.25


class StateSync:
    """The background half of a Redis-backed manager: writes, re-reads, announcements, leases.

    Two tasks: one writes dirty services and re-reads all of them every `sync_interval_seconds`
    (reconnecting with backoff while the store is down); one applies other instances'
    announcements as they arrive. Only `acquire_probe` is awaited by a request, bounded.
    """

    def __init__(
        self, store: StateStore, manager: CircuitBreakerManager, settings: RedisSettings
    ) -> None:
        self.store = store
        self._manager = manager
        self._interval = settings.sync_interval_seconds
        self._dirty: set[str] = set()
        self._to_load: set[str] = set()
        self._writing: set[str] = set()  # services whose write is in flight
        self._leases_to_free: set[tuple[str, str]] = set()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._tokens = itertools.count()
        self._instance = uuid.uuid4().hex[:12]
        self.connected = False
        self._outage_logged = False
        self._closing = False
        self._resubscribed = False  # the next re-read follows a lost subscription

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
                # A probe past its deadline has no claim on the slot: abandoned, it frees then.
                min(policy.probe_lease_seconds, breaker.probe_deadline()),
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
            breaker.release(permit)  # the fleet moved on while we asked; frees the slot
            return False
        breaker.release(permit)
        # Not the whole lease: a prober that gives its slot back early (its client left, its
        # call was cancelled) frees it for the fleet at once, and we ask again soon.
        breaker.hold_probes(min(wait, PROBE_RECHECK_SECONDS))
        return False

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, services: list[str]) -> None:
        try:
            await self.store.connect()
            self.connected = True
            logger.debug(
                "Circuit breaker Redis persistence enabled (url=%s)", self.store.describe()
            )
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
                    after_outage, self._resubscribed = self._resubscribed, False
                    await self._reconcile(names, after_outage=after_outage)
                if self._dirty:
                    await self._flush()
                while self._leases_to_free:
                    service, token = self._leases_to_free.pop()
                    await self.store.release_probe(service, token)
                if time.monotonic() >= next_sync:
                    next_sync = time.monotonic() + self._interval
                    await self._reconcile(list(self._manager.breakers()))
            except StoreError as exc:
                self._lost(exc)

    async def _listen(self) -> None:
        """Apply other instances' transitions as they are announced (milliseconds)."""
        backoff = 0.05
        subscribed = False
        while not self._closing:
            if not self.connected:
                await self._sleep(0.05)
                continue
            try:
                async for event in self.store.events():
                    if event is None:
                        # (Re)subscribed: what was announced while cut off is lost; re-read.
                        backoff = 0.05
                        self._resubscribed = subscribed  # cut off: Redis may have lost keys
                        subscribed = True
                        self._to_load.update(self._manager.breakers())
                        self._wake.set()
                    else:
                        self._apply(*event)
            except StoreError as exc:
                logger.debug("Circuit breaker event subscription lost: %s", exc)
            except Exception:
                # A last resort: whatever broke, the listener lives on and subscribes again.
                logger.exception("Circuit breaker event listener failed; restarting it")
            await self._sleep(backoff * random.uniform(0.5, 1.5))
            backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

    def _apply(self, service: str, snapshot: BreakerSnapshot) -> None:
        breaker = self._manager.find(service)
        if breaker is None or not _newer(snapshot.version, breaker.version):
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
            await self._reconcile(list(self._manager.breakers()), after_outage=True)
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

    async def _reconcile(self, services: Iterable[str], *, after_outage: bool = False) -> None:
        breakers = self._manager.breakers()
        names = [s for s in services if s in breakers]
        stored = await self.store.load(names)
        for name in names:
            if name in self._dirty:
                continue  # our write decides, by compare-and-set
            breaker = breakers[name]
            snapshot = stored.get(name)
            if snapshot is None:
                if breaker.state is CircuitState.CLOSED:
                    continue
                if breaker.version and not after_outage and self.store.absence_means_reset(name):
                    # Gone while we were connected: deleted (or expired). That resets it.
                    self._adopt(breaker, BreakerSnapshot(CircuitState.CLOSED))
                else:
                    self.mark_dirty(name)  # never stored, lost, or unusable: put ours back
            elif snapshot.version != breaker.version or (
                # The seed's own format has no version: honour what it says.
                snapshot.version == 0 and snapshot.state is not breaker.state
            ):
                self._adopt(breaker, snapshot)
        if self._dirty:
            await self._flush()

    async def _flush(self) -> None:
        breakers = self._manager.breakers()
        while self._dirty:
            name = self._dirty.pop()
            breaker = breakers.get(name)
            if breaker is None:
                continue
            snapshot = breaker.snapshot()
            self._writing.add(name)
            try:
                result = await self.store.write(name, snapshot)
            except BaseException as exc:
                self._dirty.add(name)
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
                self._dirty.add(name)  # write again, on top of it
            else:
                # Another instance wrote a newer state first: theirs is the fleet's.
                self._dirty.discard(name)
                self._adopt(breaker, stored)

    def _adopt(self, breaker: CircuitBreaker, snapshot: BreakerSnapshot) -> None:
        breaker.restore(snapshot)
        logger.debug(
            "Restored circuit breaker state from Redis (service=%s, state=%s, failure_count=%d)",
            breaker.name,
            snapshot.state.value,
            snapshot.failure_count,
        )


def _newer(version: int, known: int) -> bool:
    """Whether `version` follows `known`; the store's script starts again at 1 after 2**53 - 1."""
    return version > known or known - version > 2**52


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
