"""Writes: local transitions reach Redis by compare-and-set, off the request path.

Cost: one script call (compare-and-set, history, announcement) per local transition, whatever
N and S; nothing while no breaker of this instance changes. Each write reaches the N - 1 other
instances as one announcement (and, with client tracking, one invalidation) each.
"""

from __future__ import annotations

import time

from gateway_breaker.breaker import BreakerSnapshot, CircuitBreaker, CircuitState
from gateway_breaker.errors import StoreError
from gateway_breaker.sync.base import (
    COMMAND_TIMEOUT_SECONDS,
    PENDING_HISTORY,
    SyncBase,
    logger,
)
from gateway_breaker.views import TransitionEvent


class Writes(SyncBase):
    """Local transitions to Redis: dirty services written by compare-and-set."""

    def mark_dirty(self, service: str) -> None:
        self.view_changed()
        self._dirty.add(service)
        self._wake.set()

    def queue_history(self, service: str, event: TransitionEvent) -> None:
        """Keep a local transition for the history; it rides in the service's next write."""
        pending = self._pending_history.setdefault(service, [])
        pending.append(event)
        if len(pending) > PENDING_HISTORY:
            del pending[0]

    async def write_now(self, service: str) -> bool:
        """Wait until `service`'s local change is in Redis (bounded). False: a newer state
        another instance wrote superseded it (apply it again on top). Raises StoreError when
        Redis is unreachable: the change stays applied here and is written on reconnect."""
        self._superseded.discard(service)
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
        return service not in self._superseded

    def _unsent(self, service: str) -> bool:
        """Whether a local change of `service` is not in the store yet (queued or in flight)."""
        return service in self._dirty or service in self._writing

    async def _flush(self) -> None:
        breakers = self._manager.breakers()
        while self._dirty:
            name = self._dirty.pop()
            breaker = breakers.get(name)
            if breaker is None or breaker.local:
                continue  # open for this instance only: never the fleet's state
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
                self.view_changed()
                logger.debug(
                    "Persisted circuit breaker state to Redis (service=%s, state=%s)",
                    name,
                    snapshot.state.value,
                )
            elif stored.version < breaker.version:
                continue  # a newer state was applied while we wrote; nothing to adopt
            elif _knows_more(breaker, stored):
                breaker.version = stored.version
                self.view_changed()
                self._pending_history[name] = events + self._pending_history.get(name, [])
                self._dirty.add(name)  # write again, on top of it
            else:
                # Another instance wrote a newer state first: theirs is the fleet's.
                self._dirty.discard(name)
                self._superseded.add(name)
                self._adopt(breaker, stored)

    def _adopt(self, breaker: CircuitBreaker, snapshot: BreakerSnapshot) -> None:
        # Our unsent transitions lost to the fleet's: they never happened for the fleet.
        self._pending_history.pop(breaker.name, None)
        self.view_changed()
        if breaker.restore(snapshot):
            self._manager.adopted(breaker)
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
