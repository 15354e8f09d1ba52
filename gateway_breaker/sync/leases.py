"""Leases: fleet-wide half-open probe slots, the one bounded round trip of a request."""

from __future__ import annotations

from gateway_breaker.breaker import CircuitBreaker, Permit
from gateway_breaker.errors import StoreError
from gateway_breaker.sync.base import (
    PROBE_LEASE_TIMEOUT_SECONDS,
    PROBE_RECHECK_SECONDS,
    SyncBase,
    logger,
)


class Leases(SyncBase):
    """Fleet-wide half-open probe slots."""

    async def acquire_probe(self, breaker: CircuitBreaker, permit: Permit) -> bool:
        """Take a fleet-wide probe slot for `permit`. False: another instance probes.

        Without Redis (or when it does not answer in time) the breaker's own per-instance
        limit is all there is, and the probe goes ahead.
        """
        if not self.connected or breaker.local:
            return True  # a breaker open for this instance only probes for itself
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
            breaker.refuse(permit)  # the fleet moved on while we asked; frees the slot
            return False
        breaker.refuse(permit)
        # Not the whole lease: a prober that gives its slot back early (its client left, its
        # call was cancelled) frees it for the fleet at once, and we ask again soon.
        breaker.hold_probes(min(wait, PROBE_RECHECK_SECONDS))
        return False

    def free_probe(self, service: str, token: str) -> None:
        self._leases_to_free.add((service, token))
        self._wake.set()
