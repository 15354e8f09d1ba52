"""Registry: this instance's registration and the fleet's live instances."""

from __future__ import annotations

import time

from gateway_breaker.breaker import BreakerSnapshot
from gateway_breaker.errors import StoreError
from gateway_breaker.sync.base import (
    SyncBase,
)
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
        ttl = max(5.0, 3 * self._interval)
        await self.store.register(self._manager.instance_view(), ttl=ttl)
        await self._count_live()

    async def _count_live(self) -> None:
        self.live = await self.store.live_instances(max(5.0, 3 * self._interval))
        self._live_at = time.monotonic()


def _effective(snapshot: BreakerSnapshot) -> str:
    return snapshot.state.value if snapshot.manual is None else snapshot.manual.mode
