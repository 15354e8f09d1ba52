"""Host: the narrow interface through which the sync reaches the manager it serves.

The manager satisfies it; the sync never imports the manager class. Cost: every method is O(1)
except `breakers`/`services` (a view of what exists, O(S): at start, after a fault, and after a
change) and `instance_view` (O(S), at most once an interval and only after a change).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from gateway_breaker.breaker import CircuitBreaker
from gateway_breaker.views import InstanceView


class Host(Protocol):
    """What the sync needs of its manager: its breakers, its identity, and two notices."""

    instance_id: str

    def find(self, service: str) -> CircuitBreaker | None:
        """The breaker of `service` if this instance uses it (never creates one)."""
        ...

    def breakers(self) -> dict[str, CircuitBreaker]:
        """Every breaker this instance uses, by service."""
        ...

    def services(self) -> list[str]:
        """The configured and used services."""
        ...

    def instance_view(self) -> InstanceView:
        """This instance and its view of each breaker, for the fleet view."""
        ...

    def apply_policy(self, service: str, override: Mapping[str, Any] | None) -> bool:
        """Apply a live policy override read from the store (None: the file's policy)."""
        ...

    def adopted(self, breaker: CircuitBreaker) -> None:
        """The sync adopted the fleet's state for `breaker`."""
        ...

    def fleet_decided(self, breaker: CircuitBreaker) -> None:
        """The fleet opened `breaker` on this instance's evidence."""
        ...
