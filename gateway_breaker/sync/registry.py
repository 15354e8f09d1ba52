"""Registry: this instance's registration and the fleet's live instances.

Cost: a heartbeat of three commands in one round trip (ZADD, PEXPIRE, and ZCOUNT of the live
instances) per `sync_interval_seconds`, whatever the number of services S; the instance's
record (its view of each breaker, O(S) bytes) is written only when that view changed, at most
once an interval, and at most once every S / 1,000 intervals beyond 1,000 services (the same
bytes a second as 1,000 services' record). Redis's cost is O(N) at rest; during a burst of
transitions O(N x min(S, 1,000)) bytes a second.
"""

from __future__ import annotations

import time

from gateway_breaker.breaker import BreakerSnapshot
from gateway_breaker.errors import StoreError
from gateway_breaker.sync.base import RECORD_SERVICES_PER_INTERVAL, SyncBase
from gateway_breaker.views import FleetView


class Registry(SyncBase):
    """Live instances: this one's registration and the fleet view."""

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

    async def _register_instance(self) -> None:
        """The record when this instance's view changed (or the record is gone), else only
        the heartbeat: at most one O(S) write an interval however many transitions it saw,
        and with many services less often (`RECORD_SERVICES_PER_INTERVAL`)."""
        ttl = max(5.0, 3 * self._interval)
        now = time.monotonic()
        changed = self._view_changed and now >= self._record_due
        if changed:
            self._view_changed = False
        view = self._manager.instance_view() if changed else None
        if view is None or view.breakers == self._registered:
            live = await self.store.heartbeat(self._instance, ttl)
            if live is not None:
                self.live, self._live_at = live, time.monotonic()
                return
        # The view changed, or the record is gone (expired, or Redis restarted).
        view = view or self._manager.instance_view()
        try:
            await self.store.register(view, ttl=ttl)
        except StoreError:
            self._view_changed = True  # written at the next heartbeat after the outage
            raise
        self._registered = dict(view.breakers)
        # Writing S services' views costs O(S): beyond RECORD_SERVICES_PER_INTERVAL services,
        # proportionally less often (10,000 services: every 10 intervals at most).
        spacing = max(1.0, len(view.breakers) / RECORD_SERVICES_PER_INTERVAL) * self._interval
        self._record_due = now + spacing - self._interval / 2
        await self._count_live()

    async def _count_live(self) -> None:
        self.live = await self.store.live_instances(max(5.0, 3 * self._interval))
        self._live_at = time.monotonic()


def _effective(snapshot: BreakerSnapshot) -> str:
    return snapshot.state.value if snapshot.manual is None else snapshot.manual.mode
