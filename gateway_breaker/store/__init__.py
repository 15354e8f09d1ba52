"""State stores: where breakers share their state between gateway instances."""

from gateway_breaker.store.base import StateStore, WriteResult

__all__ = ["StateStore", "WriteResult"]
