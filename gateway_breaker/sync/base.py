"""The state every part of the sync shares, and how an outage is noted.

Cost: O(1) memory per service this instance uses (a few set entries while work is pending);
an outage is noted once, and every breaker is told (O(S), once an outage).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time

from gateway_breaker.config import RedisSettings
from gateway_breaker.errors import StoreError
from gateway_breaker.store.base import StateStore
from gateway_breaker.sync.host import Host
from gateway_breaker.views import TransitionEvent

logger = logging.getLogger("gateway_breaker")

FLUSH_TIMEOUT_SECONDS = 2.0
TASK_STOP_TIMEOUT_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 5.0
# A service's first call waits at most this long for the fleet's state of it.
FIRST_LOAD_TIMEOUT_SECONDS = 0.25
# The one round trip a request may wait on: taking a fleet-wide probe slot.
PROBE_LEASE_TIMEOUT_SECONDS = 0.25
# An operator's command waits at most this long for its write to reach Redis.
COMMAND_TIMEOUT_SECONDS = 2.0
# Transitions kept for the history while they wait for their write (Redis down, say).
PENDING_HISTORY = 50
# While another instance holds the probe slots, ask again after at most this long.
PROBE_RECHECK_SECONDS = 0.25
# Services re-read each `sync_interval_seconds` by the slow round-robin safety net: with
# client tracking, which reports every change (a full sweep of 10,000 services every 500 s;
# each key read costs Redis a tracking entry, and 200 instances read them every second),
# without it (every 10 s: the bound for a value written past the gateways), and on a Cluster,
# where each key costs a command (re-reads stay under the command budget).
SWEEP_TRACKED = 20
SWEEP_UNTRACKED = 1000
SWEEP_PER_KEY = 2
# After a fault (an outage, a lost subscription or tracking) every service is re-read at once
# (other instances put back what they changed meanwhile within their next interval) and again
# this many seconds later (each spread by +-20%, so that a fleet that saw the same
# fault does not re-read in step): whatever a failover, a cut connection or a write that timed
# out after it landed left different, the fleet agrees again within seconds. A few O(S) reads a
# fault, never O(S) a second for long: at 200 x 10,000 that would keep Redis too busy to answer,
# and make a fault of its own.
RECOVERY_READS = (2.0, 10.0)
# The instance's record (its view of every breaker, for the fleet view) holds this many
# services' views per interval at most: with 10,000 services it is written every 10 intervals
# at most, so that a burst costs the instance and Redis no more bytes a second than 1,000.
RECORD_SERVICES_PER_INTERVAL = 1000
# Services named in a log line at most (the count says how many in all).
LOGGED_SERVICES = 10


def named(services: list[str]) -> str:
    """Services for a log line: the first few, and how many in all."""
    shown = ",".join(services[:LOGGED_SERVICES])
    more = len(services) - LOGGED_SERVICES
    return f"{shown},... ({len(services)} in all)" if more > 0 else shown


class SyncBase:
    """What every part of the sync shares: the store, the manager, the outage bookkeeping."""

    def __init__(
        self,
        store: StateStore,
        manager: Host,
        settings: RedisSettings,
        *,
        register: bool = True,
    ) -> None:
        self.store = store
        self._manager = manager
        self._register = register
        self._interval = settings.sync_interval_seconds
        self.errors: dict[str, int] = {}  # failed store operations by kind
        self._pending_history: dict[str, list[TransitionEvent]] = {}
        self._policies_to_load: set[str] = set()
        self._policy_writing: set[str] = set()  # policies this instance's command is storing
        self._superseded: set[str] = set()  # local changes another instance's state replaced
        self._dirty: set[str] = set()
        self._to_load: set[str] = set()
        self._writing: set[str] = set()  # services whose write is in flight
        self._leases_to_free: set[tuple[str, str]] = set()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._tokens = itertools.count()
        self._instance = manager.instance_id
        self.connected = False
        self._outage_logged = False
        self._closing = False
        # Fleet evidence: services with counts the fleet has not seen, sent at most every
        # `evidence_flush_seconds`; `live` is the number of registered instances (0: unknown).
        self._evidence: set[str] = set()
        self._evidence_interval = settings.evidence_flush_seconds
        self._evidence_next = 0.0
        self._evidence_timer: asyncio.TimerHandle | None = None
        self.live = 0
        self._live_at = 0.0  # when `live` was counted (monotonic)
        # service -> (run we sent, fleet's run and failing instances in the reply): a run that
        # may have brought the fleet near its threshold is sent without waiting the interval.
        self._sent: dict[str, tuple[int, int, int, int]] = {}  # with the breaker's generation
        self._urgent = False
        self._urgent_next = 0.0
        # The view of the breakers in this instance's registered record (None: not written).
        self._registered: dict[str, tuple[str, int]] | None = None
        # Whether any breaker's state, manual mode or version may have changed since the view
        # was last taken: at rest nothing walks the S breakers (the record and the timed manual
        # modes are looked at again only after a change).
        self._view_changed = True
        self._timed_stale = True  # the same, for the list of timed manual modes
        self._timed: list[str] = []  # services in a manual mode that ends by itself
        self._record_due = 0.0  # monotonic: the record may be written again from then
        self._resubscribed = False  # the next re-read follows a lost subscription
        self._sweep_names: list[str] | None = None  # this lap of the round-robin re-read
        self._sweep_at = 0
        self._full_reads: list[float] = []  # monotonic: when to re-read everything again

    def view_changed(self) -> None:
        """A breaker's state, manual mode or version changed, or a breaker was created."""
        self._view_changed = self._timed_stale = True

    def _expire_manual(self) -> None:
        """End the timed manual modes whose time is up, even with no traffic: O(timed modes),
        and O(S) once after a change to find them."""
        if self._timed_stale:
            self._timed_stale = False
            self._timed = [
                name
                for name, breaker in self._manager.breakers().items()
                if breaker.manual is not None and breaker.manual.until is not None
            ]
        for name in self._timed:
            breaker = self._manager.find(name)
            if breaker is not None:
                breaker.expire_manual()

    async def _sleep(self, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):
                await asyncio.Event().wait()
        except TimeoutError:
            pass

    def _recovering(self) -> None:
        """A fault happened: re-read every service every interval for a while."""
        now = time.monotonic()
        self._full_reads = [now + s * random.uniform(0.8, 1.2) for s in RECOVERY_READS]

    def _lost(self, exc: StoreError, service: str | None = None) -> None:
        self._recovering()
        self.errors[exc.operation] = self.errors.get(exc.operation, 0) + 1
        self.connected = False
        self._wake.set()
        alone = self._set_fleet(False)
        if self._outage_logged:
            return
        self._outage_logged = True
        if service is not None:
            logger.error(
                "Failed to persist circuit breaker state to Redis (service=%s, error=%s)",
                service,
                exc,
            )
        logger.warning(
            "Failed to connect to Redis for circuit breaker persistence, falling back to"
            " in-memory only (url=%s, error=%s)",
            self.store.describe(),
            exc,
        )
        if alone:
            logger.warning(
                "Circuit breakers count failures per instance while Redis is unreachable"
                " (services=%s)",
                named(alone),
            )

    def _set_fleet(self, available: bool) -> list[str]:
        """Tell every breaker whether fleet counting is possible. Returns the services that
        counted for the fleet and no longer do."""
        changed = []
        for name, breaker in sorted(self._manager.breakers().items()):
            was = breaker.fleet_counting
            breaker.set_fleet(available)
            if was and not breaker.fleet_counting:
                changed.append(name)
        return changed
