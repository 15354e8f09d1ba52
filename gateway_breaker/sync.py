"""StateSync: keeps the manager's breakers and the store in agreement, in the background.

Local transitions mark a service dirty (no I/O on the request path); one task writes dirty
services with compare-and-set, re-reads every service's stored state periodically and after a
reconnect, and adopts newer states that other instances wrote. The store is the fleet's truth:
a breaker with no unsent change mirrors it; a write that lost a race adopts the winner.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from gateway_breaker.breaker import BreakerSnapshot, CircuitBreaker, CircuitState
from gateway_breaker.config import RedisSettings
from gateway_breaker.errors import StoreError
from gateway_breaker.store.base import StateStore

if TYPE_CHECKING:
    from gateway_breaker.manager import CircuitBreakerManager

logger = logging.getLogger("gateway_breaker")

FLUSH_TIMEOUT_SECONDS = 2.0
MAX_BACKOFF_SECONDS = 5.0
# A service's first call waits at most this long for the fleet's state of it.
FIRST_LOAD_TIMEOUT_SECONDS = 0.25


class StateSync:
    def __init__(
        self, store: StateStore, manager: CircuitBreakerManager, settings: RedisSettings
    ) -> None:
        self.store = store
        self._manager = manager
        self._interval = settings.sync_interval_seconds
        self._dirty: set[str] = set()
        self._to_load: set[str] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
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
        self._task = asyncio.create_task(self._run(), name="gateway-breaker-sync")

    async def aclose(self) -> None:
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
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
        await self.store.aclose()

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
                if time.monotonic() >= next_sync:
                    next_sync = time.monotonic() + self._interval
                    await self._reconcile(list(self._manager.breakers()))
            except StoreError as exc:
                self._lost(exc)

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

    async def _flush(self) -> None:
        breakers = self._manager.breakers()
        while self._dirty:
            name = self._dirty.pop()
            breaker = breakers.get(name)
            if breaker is None:
                continue
            snapshot = breaker.snapshot()
            try:
                result = await self.store.write(name, snapshot)
            except BaseException as exc:
                self._dirty.add(name)
                if isinstance(exc, StoreError):
                    self._lost(exc, name)
                raise
            if result.accepted and result.stored is not None:
                breaker.version = result.stored.version
                logger.debug(
                    "Persisted circuit breaker state to Redis (service=%s, state=%s)",
                    name,
                    snapshot.state.value,
                )
            elif result.stored is not None:
                # Another instance wrote a newer state first: theirs is the fleet's.
                self._dirty.discard(name)
                self._adopt(breaker, result.stored)

    def _adopt(self, breaker: CircuitBreaker, snapshot: BreakerSnapshot) -> None:
        breaker.restore(snapshot)
        logger.debug(
            "Restored circuit breaker state from Redis (service=%s, state=%s, failure_count=%d)",
            breaker.name,
            snapshot.state.value,
            snapshot.failure_count,
        )
