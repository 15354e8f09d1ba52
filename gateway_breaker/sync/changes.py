"""Changes: other instances' transitions and policies, and values written past them, reach
this instance.

Three paths (docs/scale.md weighs them): announcements on pub/sub for every write made through
the package (O(N) messages a transition, milliseconds); invalidations Redis pushes for the keys
this instance read (client tracking: a `redis-cli SET`, DEL or expiry, O(1) a changed key); a
slow round-robin re-read of a fixed number of services a round as the last net (O(1) commands a
second, a full sweep every S / that number seconds). At rest: no command per service.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterable

from gateway_breaker.breaker import BreakerSnapshot, CircuitState
from gateway_breaker.errors import StoreError
from gateway_breaker.store.base import Invalidated
from gateway_breaker.sync.base import (
    FIRST_LOAD_TIMEOUT_SECONDS,
    MAX_BACKOFF_SECONDS,
    SWEEP_PER_KEY,
    SWEEP_TRACKED,
    SWEEP_UNTRACKED,
    logger,
)
from gateway_breaker.sync.writes import Writes, _knows_more, _newer
from gateway_breaker.views import TransitionEvent


class Changes(Writes):
    """Other instances' changes to this instance: announcements, re-reads, policies."""

    def fleet_notice(self, service: str) -> None:
        """Some instance's counts hold failures, or the policy changed: the fleet's window
        needs this instance's calls too (the evidence sync sends them)."""

    def track(self, service: str) -> None:
        self.view_changed()  # a new breaker
        self._to_load.add(service)
        self._wake.set()

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

    async def store_policy(self, service: str, fields: dict[str, object] | None) -> None:
        """Store (None: delete) a live policy override and announce it."""
        if not self.connected:
            raise StoreError("Redis unreachable: the policy change was not applied", "policy")
        # Redis reports our own write as a change too: the command applies it, not a re-read.
        self._policy_writing.add(service)
        try:
            await self.store.write_policy(service, fields, self._instance)
        except StoreError as exc:
            self._lost(exc)
            raise
        finally:
            self._policy_writing.discard(service)

    async def history(self, service: str, limit: int) -> list[TransitionEvent]:
        try:
            return await self.store.history(service, limit)
        except StoreError as exc:
            self._lost(exc)
            raise

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
                        if subscribed:
                            self._recovering()
                            # A notice of the fleet's first failures may have been lost too:
                            # services with calls send their counts once (O(active S), once).
                            for name in list(self._manager.breakers()):
                                self.fleet_notice(name)
                        subscribed = True
                        self._to_load.update(self._manager.breakers())
                        self._policies_to_load.update(self._manager.breakers())
                        self._wake.set()
                    elif isinstance(event, Invalidated):
                        self._invalidated(event)
                    elif event[1] is None:
                        if self._manager.find(event[0]) is not None:
                            self._policies_to_load.add(event[0])  # a live policy change
                            self._wake.set()
                            self.fleet_notice(event[0])  # or the fleet's first failures
                    else:
                        self._apply(event[0], event[1])
            except StoreError as exc:
                logger.debug("Circuit breaker event subscription lost: %s", exc)
            except Exception:
                # A last resort: whatever broke, the listener lives on and subscribes again.
                logger.exception("Circuit breaker event listener failed; restarting it")
            await self._sleep(backoff * random.uniform(0.5, 1.5))
            backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

    def _invalidated(self, event: Invalidated) -> None:
        """Redis reports keys we read changed (written past the announcements, deleted,
        expired): read just those again, which tracks them again."""
        if event.everything:
            breakers = self._manager.breakers()
            self._to_load.update(breakers)
            self._policies_to_load.update(breakers)
        else:
            find = self._manager.find
            self._to_load.update(s for s in event.states if find(s) is not None)
            self._policies_to_load.update(s for s in event.policies if find(s) is not None)
        self._wake.set()

    def _sweep(self) -> list[str]:
        """The next few services of the slow round-robin re-read, the last safety net: a fixed
        number a round, whatever S, so a full sweep takes S / that many rounds."""
        if self._full_reads and time.monotonic() >= self._full_reads[0]:
            del self._full_reads[0]
            return list(self._manager.breakers())
        if self.store.per_key_reads:
            count = SWEEP_PER_KEY
        elif self.store.tracking:
            count = SWEEP_TRACKED
        else:
            count = SWEEP_UNTRACKED
        names = sorted(self._manager.breakers()) if self._sweep_names is None else self._sweep_names
        if self._sweep_at >= len(names):
            # A new lap: services added since the last one join it.
            names = self._sweep_names = sorted(self._manager.breakers())
            self._sweep_at = 0
        self._sweep_names = names
        batch = names[self._sweep_at : self._sweep_at + count]
        self._sweep_at += count
        return batch

    def _apply(self, service: str, snapshot: BreakerSnapshot) -> None:
        breaker = self._manager.find(service)
        if breaker is None or not _newer(snapshot.version, breaker.version):
            return  # not ours to care about, or older than what we know
        if self._unsent(service) and _knows_more(breaker, snapshot):
            breaker.version = snapshot.version
            self.view_changed()
            self.mark_dirty(service)  # our change goes on top of it
            return
        self._dirty.discard(service)  # a newer fleet state supersedes our unsent change
        self._superseded.add(service)
        self._adopt(breaker, snapshot)

    async def _reconcile(self, services: Iterable[str], *, after_outage: bool = False) -> None:
        find = self._manager.find
        names = [s for s in services if find(s) is not None]
        await self._agree(names, await self.store.load(names), after_outage=after_outage)

    async def _resweep(self, services: list[str]) -> None:
        """The slow re-read of a few services: states and policies in one round trip."""
        find = self._manager.find
        names = [s for s in services if find(s) is not None]
        stored, policies = await self.store.load_both(names)
        await self._agree(names, stored)
        self._apply_policies(names, policies)

    async def _agree(
        self, names: list[str], stored: dict[str, BreakerSnapshot], *, after_outage: bool = False
    ) -> None:
        """Adopt what the store holds where it differs (the store is the fleet's truth)."""
        find = self._manager.find
        for name in names:
            if name in self._dirty:
                continue  # our write decides, by compare-and-set
            breaker = find(name)
            if breaker is None:
                continue
            snapshot = stored.get(name)
            if snapshot is None:
                if breaker.state is CircuitState.CLOSED or breaker.local:
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

    async def _load_policies(self, services: list[str]) -> None:
        self._apply_policies(services, await self.store.load_policies(services))

    def _apply_policies(self, services: list[str], stored: dict[str, dict[str, object]]) -> None:
        for name in services:
            if name not in self._policy_writing:
                self._manager.apply_policy(name, stored.get(name))
