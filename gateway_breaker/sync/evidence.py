"""Evidence: fleet counting, counts sent in small batches off the request path.

Cost: one script call per service with new counts at most every `evidence_flush_seconds`
(sooner near a threshold); none while every call succeeds. Grows with the services that see
failures, not with S; Redis keeps one entry per failing instance per service (O(N) at most).
"""

from __future__ import annotations

import asyncio
import time

from gateway_breaker.breaker import CircuitBreaker, CircuitState
from gateway_breaker.errors import StoreError
from gateway_breaker.store.base import Evidence, EvidenceResult
from gateway_breaker.sync.base import (
    logger,
)
from gateway_breaker.sync.changes import Changes
from gateway_breaker.sync.registry import Registry


class FleetEvidence(Changes, Registry):
    """Fleet counting: this instance's counts sent in batches, the fleet's decision applied."""

    def mark_evidence(self, service: str) -> None:
        """A fleet-counting breaker has new counts: send them with the next evidence flush."""
        self._evidence.add(service)
        if not self.connected:
            return
        if not self._urgent and self._near_threshold(service):
            self._urgent = True
            if self._evidence_timer is not None:
                self._evidence_timer.cancel()  # it was set for the ordinary interval
                self._evidence_timer = None
        if self._evidence_timer is None:
            self._schedule_evidence()

    def fleet_notice(self, service: str) -> None:
        breaker = self._manager.find(service)
        if breaker is not None and breaker.fleet_counting and breaker.window_counts()[0] > 0:
            self.mark_evidence(service)  # our calls and successes belong in the fleet's window

    def _near_threshold(self, service: str) -> bool:
        """Whether the fleet's run may have reached half the threshold since our last report:
        the fleet's run then, plus our new failures as many times as instances fail."""
        breaker = self._manager.find(service)
        if breaker is None:
            return False
        generation, sent_run, fleet_run, failing = self._sent.get(service, (0, 0, 0, 0))
        if generation != breaker.generation:
            sent_run = fleet_run = failing = 0  # a transition since: a new period's counts
        new = breaker.failure_count - sent_run
        if new <= 0:
            return False
        return (
            2 * (fleet_run + new * max(failing, self.live, 1)) >= breaker.policy.failure_threshold
        )

    def _schedule_evidence(self) -> None:
        due = self._urgent_next if self._urgent else self._evidence_next
        delay = due - time.monotonic()
        if delay <= 0:
            self._wake.set()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._wake.set()
            return
        self._evidence_timer = loop.call_later(delay, self._evidence_due)

    def _evidence_due(self) -> None:
        self._evidence_timer = None
        self._wake.set()

    def quorum(self, breaker: CircuitBreaker) -> int:
        """The quorum the fleet's decision needs: the policy's, or every live instance when
        fewer are registered (at least 1; the policy's while the number is unknown)."""
        quorum = breaker.policy.quorum
        if quorum > 1 and self.live > 0:
            quorum = min(quorum, self.live)
        return quorum

    async def _send_evidence(self) -> None:
        """One script call per service with new counts: ours in, the fleet's decision out."""
        now = time.monotonic()
        self._evidence_next = now + self._evidence_interval
        # Sends near a threshold come at most ten times as often as the others.
        self._urgent, self._urgent_next = False, now + self._evidence_interval / 10
        names, self._evidence = sorted(self._evidence), set()
        breakers = self._manager.breakers()
        quorums = [b.policy.quorum for n in names if (b := breakers.get(n)) is not None]
        if self._register and max(quorums, default=1) > 1:
            # Fewer live instances than a quorum lowers it: count them afresh before relying
            # on that (instances that started since the last count are live too).
            stale = time.monotonic() - self._live_at > self._interval
            if stale or self.live < max(quorums):
                try:
                    await self._count_live()
                except StoreError as exc:
                    self._evidence.update(names)
                    self._lost(exc)
                    raise
        for i, name in enumerate(names):
            breaker = breakers.get(name)
            if (
                breaker is None
                or not breaker.fleet_counting
                or breaker.manual is not None
                or (breaker.state is not CircuitState.CLOSED and not breaker.local)
            ):
                continue  # nothing the fleet's decision needs from us now
            policy = breaker.policy
            run = breaker.failure_count
            calls, failures = breaker.window_counts()
            evidence = Evidence(
                instance=self._manager.instance_id,
                run=run,
                calls=calls,
                failures=failures,
                version=breaker.version,
                window_seconds=policy.window_seconds,
                failure_threshold=policy.failure_threshold,
                min_calls=policy.min_calls,
                # The adaptive mode sheds instead: a threshold above 1 never holds.
                error_rate_threshold=(
                    policy.error_rate_threshold if policy.mode == "classic" else 2.0
                ),
                quorum=self.quorum(breaker),
            )
            try:
                result = await self.store.report_evidence(name, evidence)
            except BaseException as exc:
                self._evidence.update(names[i:])  # sent again after the reconnect
                if isinstance(exc, StoreError):
                    self._lost(exc, name)
                raise
            self._evidence_decided(breaker, evidence, result)

    def _evidence_decided(
        self, breaker: CircuitBreaker, evidence: Evidence, result: EvidenceResult
    ) -> None:
        name = breaker.name
        if result.outcome == "stale":
            if result.stored is not None:
                self._apply(name, result.stored)
            return
        # While any instance's counts hold failures, ours (successes too) go on being sent:
        # the fleet's window then holds every live instance's calls.
        breaker.reported = evidence.run > 0 or evidence.failures > 0 or result.failing_instances > 0
        breaker.observe_fleet(result.fleet_calls, result.fleet_failures)
        self._sent[name] = (
            breaker.generation,
            evidence.run,
            result.fleet_run,
            result.failing_instances,
        )
        if (breaker.failure_count, breaker.window_counts()[1]) != (evidence.run, evidence.failures):
            self.mark_evidence(name)  # calls ended while the counts were on their way
        stored = result.stored
        if result.outcome == "opened" and stored is not None:
            if stored.version <= breaker.version:
                return
            # Our counts opened the fleet: the stored open state is our own transition.
            self._dirty.discard(name)
            self._pending_history.pop(name, None)
            self.view_changed()
            if breaker.restore(stored):
                self._manager.fleet_decided(breaker)
            logger.debug(
                "Fleet opened circuit breaker on its evidence (service=%s, failure_count=%d,"
                " instances=%d)",
                name,
                result.fleet_run,
                result.failing_instances,
            )
        elif result.outcome == "local" and not breaker.local and breaker.own_rule() is not None:
            breaker.open_locally(result.cause or "failure_threshold")
