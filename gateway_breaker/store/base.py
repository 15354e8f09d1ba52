"""StateStore: where breakers share their state. Knows nothing of HTTP or of breakers' logic."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway_breaker.breaker import BreakerSnapshot
from gateway_breaker.views import InstanceView, TransitionEvent


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

    async def write(
        self, service: str, snapshot: BreakerSnapshot, history: Sequence[TransitionEvent] = ()
    ) -> WriteResult:
        """Store `snapshot` if the stored version is still `snapshot.version` (or absent), and
        append `history` to the service's history in the same atomic step."""
        ...

    async def history(self, service: str, limit: int) -> list[TransitionEvent]:
        """The service's transitions, newest first."""
        ...

    async def load_policies(self, services: Sequence[str]) -> dict[str, dict[str, object]]:
        """Live policy overrides of `services` (absent or unusable ones left out)."""
        ...

    async def write_policy(
        self, service: str, fields: dict[str, object] | None, instance: str
    ) -> None:
        """Store a live policy override (None deletes it) and announce it to the fleet."""
        ...

    async def register(self, instance: InstanceView, ttl: float) -> None:
        """Record this instance as live for `ttl` seconds, with its view of the breakers."""
        ...

    async def instances(self) -> list[InstanceView]:
        """Every instance that registered within its ttl."""
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

    def events(self) -> AsyncIterator[tuple[str, BreakerSnapshot | None] | None]:
        """States as instances write them, `(service, None)` for a policy change; None once
        subscribed (re-read then: anything published while cut off is lost). Raises
        `StoreError` when the subscription breaks."""
        ...

    async def aclose(self) -> None:
        """Close connections. Safe to call twice."""
        ...
