"""The background half of a Redis-backed manager, one idea a module.

`writes` (dirty services -> compare-and-set), `changes` (announcements and re-reads), `evidence`
(fleet counts), `leases` (probe slots), `registry` (live instances); `state_sync` runs them.
"""

from gateway_breaker.sync.base import (
    COMMAND_TIMEOUT_SECONDS,
    FIRST_LOAD_TIMEOUT_SECONDS,
    FLUSH_TIMEOUT_SECONDS,
    MAX_BACKOFF_SECONDS,
    PENDING_HISTORY,
    PROBE_LEASE_TIMEOUT_SECONDS,
    PROBE_RECHECK_SECONDS,
    TASK_STOP_TIMEOUT_SECONDS,
)
from gateway_breaker.sync.state_sync import StateSync

__all__ = [
    "COMMAND_TIMEOUT_SECONDS",
    "FIRST_LOAD_TIMEOUT_SECONDS",
    "FLUSH_TIMEOUT_SECONDS",
    "MAX_BACKOFF_SECONDS",
    "PENDING_HISTORY",
    "PROBE_LEASE_TIMEOUT_SECONDS",
    "PROBE_RECHECK_SECONDS",
    "TASK_STOP_TIMEOUT_SECONDS",
    "StateSync",
]
