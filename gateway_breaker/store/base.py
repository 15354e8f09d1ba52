"""StateStore: where breakers share their state. Knows nothing of HTTP or of breakers' logic."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway_breaker.breaker import BreakerSnapshot


@dataclass(frozen=True, slots=True)
class WriteResult:
    """Outcome of a compare-and-set write.

    `accepted`: the snapshot was stored as `stored` (with its new version). Otherwise `stored`
    is the newer state another instance wrote (None when the key holds nothing usable).
    """

    accepted: bool
    stored: BreakerSnapshot | None


class StateStore(Protocol):
    """Shared breaker state, one record per service, versioned.

    Every method may raise `StoreError` when the backend cannot be reached; callers keep working
    in memory and try again later.
    """

    def describe(self) -> str:
        """Where the store lives, safe to log (no password)."""
        ...

    async def connect(self) -> None:
        """Open connections and check the backend answers."""
        ...

    async def load(self, services: Sequence[str]) -> dict[str, BreakerSnapshot]:
        """Stored states of `services` in one round trip; absent or unusable ones are left out."""
        ...

    def absence_means_reset(self, service: str) -> bool:
        """Whether `service`'s value missing from the last read means someone deleted it
        (not: an unusable value was left out, or a new master after a failover lacks it)."""
        ...

    async def write(self, service: str, snapshot: BreakerSnapshot) -> WriteResult:
        """Store `snapshot` if the stored version is still `snapshot.version` (or absent)."""
        ...

    async def acquire_probe(
        self, service: str, token: str, slots: int, lease_seconds: float, limit: float
    ) -> float:
        """Take one of `slots` fleet-wide half-open probe slots for `lease_seconds`.

        Returns 0.0 when taken, else the seconds until a slot may free up. Bounded by `limit`.
        """
        ...

    async def release_probe(self, service: str, token: str) -> None:
        """Give a probe slot back before its lease runs out."""
        ...

    def events(self) -> AsyncIterator[tuple[str, BreakerSnapshot] | None]:
        """States as instances write them; None once subscribed (re-read then: anything
        published while cut off is lost). Raises `StoreError` when the subscription breaks."""
        ...

    async def aclose(self) -> None:
        """Close connections. Safe to call twice."""
        ...
