"""CircuitBreakerManager: one breaker per service, `call()`, and the wiring to a state store."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import itertools
import logging
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

from pydantic import ValidationError

from gateway_breaker.breaker import (
    MANUAL_MODES,
    CircuitBreaker,
    CircuitState,
    Clock,
    ManualMode,
    Permit,
)
from gateway_breaker.config import Config, check_service_name
from gateway_breaker.errors import CircuitOpenError, ConfigError, PolicyError, StoreError
from gateway_breaker.policy import Policy
from gateway_breaker.protect import (
    Decorator,
    FallbackDecorator,
    Ignore,
    ignore_rule,
    protect,
    settle,
)
from gateway_breaker.views import (
    MANUAL_CAUSES,
    BreakerView,
    FleetView,
    InstanceView,
    TransitionEvent,
)

if TYPE_CHECKING:
    from gateway_breaker.store.base import StateStore
    from gateway_breaker.sync import StateSync

T = TypeVar("T")
P = ParamSpec("P")
logger = logging.getLogger("gateway_breaker")

RECENT_EVENTS = 1000  # events kept for `events(after=...)` replays
HISTORY_PER_BREAKER = 100  # in-memory history (the Redis stream keeps more)
COMMAND_ATTEMPTS = 5  # an operator's command re-applied on top of newer fleet states
SUBSCRIBER_QUEUE = 1000  # a subscriber that falls this far behind loses its oldest events
TransitionCallback = Callable[[TransitionEvent], object]


class CircuitBreakerManager:
    """Breakers by service name, created on first use with the service's policy.

    `CircuitBreakerManager(config)` keeps state in memory. `await CircuitBreakerManager.with_redis(
    config)` shares it through Redis. Either way a request never waits on the store: transitions
    are written in the background and other instances' transitions are applied as they arrive.
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        store: StateStore | None = None,
        clock: Clock | None = None,
        register: bool = True,
    ) -> None:
        self.config = config if config is not None else Config()
        self._clock = clock
        self._breakers: dict[str, CircuitBreaker] = {}
        self.instance_id = uuid.uuid4().hex[:12]
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.started_at = (clock or time.time)()
        self.transition_counts: dict[tuple[str, str, str, str], int] = {}
        self._overrides: dict[str, dict[str, Any]] = {}  # service -> live policy fields
        self._listeners: list[TransitionCallback] = []
        self._subscribers: set[asyncio.Queue[TransitionEvent]] = set()
        self._recent: deque[TransitionEvent] = deque(maxlen=RECENT_EVENTS)
        self._history: dict[str, deque[TransitionEvent]] = {}
        self._event_ids = itertools.count(1)
        self._sync: StateSync | None = None
        if store is not None:
            from gateway_breaker.sync import StateSync

            self._sync = StateSync(store, self, self.config.redis, register=register)
        self._started = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_config(
        cls, config: Config | None = None, *, clock: Clock | None = None, register: bool = True
    ) -> CircuitBreakerManager:
        """A manager with the store the config names (Redis when `redis.url` is set and
        breakers are enabled, else memory). Not started: `await manager.start()`.

        `register=False` keeps it out of the fleet view (for short-lived tools like the CLI).
        """
        config = config if config is not None else Config()
        if config.redis.url is None or not config.circuit_breaker.enabled:
            return cls(config, clock=clock)
        from gateway_breaker.store.redis import RedisStateStore

        # The store reads the same clock as the breakers, to translate times to Redis's clock.
        store = RedisStateStore(config.redis, clock=clock or time.time)
        return cls(config, store=store, clock=clock, register=register)

    @classmethod
    def new(cls, config: Config | None = None) -> CircuitBreakerManager:
        """An in-memory manager (the seed's `CircuitBreakerManager::new`)."""
        return cls(config)

    @classmethod
    async def with_redis(
        cls, config: Config | None = None, *, clock: Clock | None = None
    ) -> CircuitBreakerManager:
        """A manager sharing state through `config.redis.url`, started.

        Raises `ConfigError` when no URL is set or it is malformed. An unreachable Redis only
        logs a warning: the manager runs in memory and reconnects in the background.
        """
        config = config if config is not None else Config()
        if config.redis.url is None:
            raise ConfigError("redis.url: a Redis URL is needed (set REDIS_URL)")
        from gateway_breaker.store.redis import RedisStateStore

        # The store reads the same clock as the breakers, to translate times to Redis's clock.
        store = RedisStateStore(config.redis, clock=clock or time.time)
        manager = cls(config, store=store, clock=clock)
        await manager.start()
        return manager

    # -- what operators see ----------------------------------------------------------------

    @property
    def store_kind(self) -> str:
        return "memory" if self._sync is None else "redis"

    @property
    def store_up(self) -> bool | None:
        """None in memory; whether the store is reachable otherwise."""
        return None if self._sync is None else self._sync.connected

    @property
    def store_errors(self) -> Mapping[str, int]:
        """Failed store operations by kind (`write`, `load`, `probe`, ...) since start."""
        return {} if self._sync is None else dict(self._sync.errors)

    @property
    def store_rejected(self) -> Mapping[str, int]:
        """Unusable values read from the store and ignored or repaired, by kind, since start."""
        rejected = None if self._sync is None else getattr(self._sync.store, "rejected", None)
        return {} if rejected is None else dict(rejected.counts)

    def services(self) -> list[str]:
        """Every service with a breaker (configured ones are created at start), sorted."""
        return sorted({*self.config.circuit_breaker.services, *self._breakers})

    def view(self, service: str) -> BreakerView:
        """The breaker of `service` as this instance sees it. KeyError if it has none."""
        breaker = self._known(service)
        return BreakerView.of(breaker, policy_overridden=service in self._overrides)

    def views(self) -> list[BreakerView]:
        return [self.view(name) for name in sorted(self._breakers)]

    def on_transition(self, callback: TransitionCallback) -> Callable[[], None]:
        """Call `callback(event)` after every transition (soon after, never on the request
        path). Returns a function that unsubscribes it."""
        self._listeners.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(callback)

        return unsubscribe

    async def events(self, after: int | None = None) -> AsyncIterator[TransitionEvent]:
        """Transitions as they happen. With `after`, first the buffered events newer than it.

        A subscriber that falls more than SUBSCRIBER_QUEUE events behind loses the oldest.
        """
        queue: asyncio.Queue[TransitionEvent] = asyncio.Queue(SUBSCRIBER_QUEUE)
        if after is not None:
            for event in self._recent:
                if event.id > after:
                    queue.put_nowait(event)
        self._subscribers.add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._subscribers.discard(queue)

    async def history(self, service: str, limit: int = 50) -> list[TransitionEvent]:
        """Transitions of `service`, newest first: the fleet's (Redis) or this instance's."""
        self._known(service)
        limit = max(1, min(int(limit), 1000))
        if self._sync is not None and self._sync.connected:
            return await self._sync.history(service, limit)
        return list(reversed(self._history.get(service, ())))[:limit]

    async def fleet(self) -> FleetView:
        """Every live instance and its view of each breaker, and what the store holds."""
        if self._sync is not None:
            return await self._sync.fleet()
        return FleetView(instances=[self.instance_view()], store={})

    def instance_view(self) -> InstanceView:
        from gateway_breaker import __version__

        return InstanceView(
            id=self.instance_id,
            host=self.host,
            pid=self.pid,
            started_at=self.started_at,
            last_seen=(self._clock or time.time)(),
            version=__version__,
            breakers={n: (b.effective_state, b.version) for n, b in self._breakers.items()},
        )

    # -- what operators do (fleet-wide with Redis) -----------------------------------------

    async def set_manual(
        self, service: str, mode: str, *, seconds: float | None = None, reason: str | None = None
    ) -> BreakerView:
        """Put `service` in a manual mode, fleet-wide; `seconds` ends it by itself.

        With Redis the change is written before this returns; if Redis is unreachable it
        applies here, is written when Redis returns, and `StoreError` says so.
        """
        if mode not in MANUAL_MODES:
            raise PolicyError(
                f"mode: must be one of {', '.join(MANUAL_MODES)}",
                [{"field": "mode", "message": f"must be one of {', '.join(MANUAL_MODES)}"}],
            )
        if seconds is not None and not 0 < seconds <= 366 * 86_400:
            raise PolicyError(
                "seconds: must be > 0 and at most a year",
                [{"field": "seconds", "message": "must be > 0 and at most a year"}],
            )
        breaker = self._known(service)
        now = breaker.clock()
        until = None if seconds is None else now + seconds
        manual = ManualMode(mode, until, reason, since=now)
        await self._command(service, lambda b: b.set_manual(manual, "manual", reason))
        return self.view(service)

    async def clear_manual(self, service: str, *, reason: str | None = None) -> BreakerView:
        """Lift the manual mode of `service`: the automatic state machine decides again."""

        def release(breaker: CircuitBreaker) -> None:
            if breaker.manual is not None:
                breaker.set_manual(None, "manual_released", reason)

        await self._command(service, release)
        return self.view(service)

    async def reset(self, service: str, *, reason: str | None = None) -> BreakerView:
        """Start `service` over, fleet-wide: closed, counters cleared, manual mode lifted."""
        await self._command(service, lambda b: b.reset(reason))
        return self.view(service)

    async def set_policy(
        self, service: str, fields: Mapping[str, Any], *, reason: str | None = None
    ) -> BreakerView:
        """Change policy fields of `service` fleet-wide, without a restart. Raises
        `PolicyError` naming the field; kept in Redis until `clear_policy`."""
        self._known(service)
        override = {**self._overrides.get(service, {}), **fields}
        self.policy_for(service, override)  # validates
        if self._sync is not None:
            await self._sync.store_policy(service, override)
        self.apply_policy(service, override, reason=reason, origin="manual")
        await self._commit(service)
        return self.view(service)

    async def clear_policy(self, service: str, *, reason: str | None = None) -> BreakerView:
        """Return `service` to the configured policy, fleet-wide."""
        self._known(service)
        if self._sync is not None:
            await self._sync.store_policy(service, None)
        self.apply_policy(service, None, reason=reason, origin="manual")
        await self._commit(service)
        return self.view(service)

    def policy_for(self, service: str, override: Mapping[str, Any] | None = None) -> Policy:
        """The configured policy of `service` with `override` (default: the live one) on top."""
        base = self.config.policy(service)
        fields = self._overrides.get(service) if override is None else override
        if not fields:
            return base
        allowed = set(Policy.model_fields)
        errors = [
            {"field": str(name), "message": "unknown policy field"}
            for name in fields
            if name not in allowed
        ]
        if not errors:
            try:
                return type(base)(**{**base.model_dump(exclude_unset=True), **fields})
            except ValidationError as exc:
                for error in exc.errors():
                    where = ".".join(str(part) for part in error["loc"]) or "policy"
                    errors.append({"field": where, "message": error["msg"]})
        text = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        raise PolicyError(text, errors)

    def apply_policy(
        self,
        service: str,
        override: Mapping[str, Any] | None,
        *,
        reason: str | None = None,
        origin: str = "fleet",
    ) -> bool:
        """Apply a live policy override (None: back to the configured policy) on this instance.
        Returns whether it changed anything. For the store's sync and the commands above.

        An operator's change (`origin="manual"`) goes into the fleet's history with the state
        write that follows it; one adopted from the fleet is only announced here."""
        current = self._overrides.get(service)
        new = dict(override) if override else None
        if new == current:
            return False
        try:
            policy = self.policy_for(service, new or {})
        except PolicyError as exc:
            logger.warning("Ignoring unusable policy override (service=%s, error=%s)", service, exc)
            return False
        if new is None:
            self._overrides.pop(service, None)
        else:
            self._overrides[service] = new
        breaker = self._breakers.get(service)
        if breaker is not None:
            breaker.set_policy(policy)
            state = breaker.effective_state
            event = self._emit(breaker, state, state, "policy", reason, origin)
            if origin == "manual" and self._sync is not None:
                self._sync.queue_history(service, event)
                self._sync.mark_dirty(service)
        return True

    async def _command(self, service: str, apply: Callable[[CircuitBreaker], None]) -> None:
        """Apply an operator's command here and write it; if a newer state another instance
        wrote replaced it meanwhile, apply it again on top of that one (a command always wins)."""
        breaker = self._known(service)
        for _ in range(COMMAND_ATTEMPTS):
            apply(breaker)
            if self._sync is None or await self._sync.write_now(service):
                return
        raise StoreError("the fleet's state kept changing under the command; try again", "command")

    async def _commit(self, service: str) -> None:
        if self._sync is not None:
            await self._sync.write_now(service)

    def _known(self, service: str) -> CircuitBreaker:
        breaker = self._breakers.get(service)
        if breaker is None:
            raise KeyError(service)
        return breaker

    # -- breakers --------------------------------------------------------------------------

    def get(self, service: str) -> CircuitBreaker:
        """The breaker of `service`, created (and its shared state fetched) on first use."""
        breaker = self._breakers.get(service)
        if breaker is None:
            breaker = self._create(service)
            if self._sync is not None:
                self._sync.track(service)
        return breaker

    def find(self, service: str) -> CircuitBreaker | None:
        """The breaker of `service` if it exists; never creates one."""
        return self._breakers.get(service)

    def breakers(self) -> dict[str, CircuitBreaker]:
        """Every breaker created so far, by service name (a copy)."""
        return dict(self._breakers)

    def _create(self, service: str) -> CircuitBreaker:
        check_service_name(service)
        kwargs: dict[str, Any] = {
            "on_transition": self._on_transition,
            "on_probe_done": self._on_probe_done,
            "on_evidence": self._on_evidence,
        }
        if self._clock is not None:
            kwargs["clock"] = self._clock
        breaker = CircuitBreaker(service, self.policy_for(service), **kwargs)
        self._breakers[service] = breaker
        if self._sync is not None and self._sync.connected:
            breaker.set_fleet(True)
        return breaker

    def _on_transition(self, breaker: CircuitBreaker, previous: CircuitState) -> None:
        cause = breaker.last_cause or "unknown"
        origin = "manual" if cause in MANUAL_CAUSES else "local"
        event = self._emit(
            breaker, breaker.last_from, breaker.last_to, cause, breaker.last_reason, origin
        )
        if self._sync is not None:
            self._sync.view_changed()
        if breaker.local:
            # Opened (or probing, or closed again) for this instance only: never the fleet's.
            if breaker.last_from == "closed":
                logger.warning(
                    "Circuit breaker opened for this instance only (service=%s, quorum=%d)",
                    breaker.name,
                    breaker.policy.quorum,
                )
            return
        if self._sync is not None:
            self._sync.queue_history(breaker.name, event)
            self._sync.mark_dirty(breaker.name)

    def _on_evidence(self, breaker: CircuitBreaker) -> None:
        if self._sync is not None:
            self._sync.mark_evidence(breaker.name)

    def fleet_decided(self, breaker: CircuitBreaker) -> None:
        """This instance's counts made the fleet open `breaker` (in the store already)."""
        self._emit(
            breaker,
            breaker.last_from,
            breaker.last_to,
            breaker.last_cause or "failure_threshold",
            None,
            "local",
        )

    def adopted(self, breaker: CircuitBreaker) -> None:
        """The store's sync adopted another instance's state for `breaker` (origin fleet)."""
        self._emit(
            breaker,
            breaker.last_from,
            breaker.last_to,
            breaker.last_cause or "restored",
            breaker.last_reason,
            "fleet",
        )

    def _emit(
        self,
        breaker: CircuitBreaker,
        old: str,
        new: str,
        cause: str,
        reason: str | None,
        origin: str,
    ) -> TransitionEvent:
        """Count, keep and announce one transition. O(1): it may run on the request path."""
        now = breaker.clock()
        rate = breaker.failure_rate(now)
        event = TransitionEvent(
            service=breaker.name,
            at=now,
            from_state=old,
            to_state=new,
            cause=cause,
            origin=origin,
            instance=self.instance_id,
            version=breaker.version,
            failure_count=breaker.failure_count,
            failure_rate=rate,
            reason=reason,
            id=next(self._event_ids),
        )
        logger.debug(
            "Circuit breaker transition (service=%s, from=%s, to=%s, failure_count=%d,"
            " cause=%s, origin=%s)",
            breaker.name,
            old,
            new,
            breaker.failure_count,
            cause,
            origin,
        )
        key = (breaker.name, old, new, origin)
        self.transition_counts[key] = self.transition_counts.get(key, 0) + 1
        self._recent.append(event)
        ring = self._history.get(breaker.name)
        if ring is None:
            ring = self._history[breaker.name] = deque(maxlen=HISTORY_PER_BREAKER)
        ring.append(event)
        for queue in self._subscribers:
            if queue.full():
                queue.get_nowait()  # the slowest subscriber loses its oldest event
            queue.put_nowait(event)
        if self._listeners:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            for callback in list(self._listeners):
                if loop is None:
                    _run_listener(callback, event)
                else:
                    loop.call_soon(_run_listener, callback, event)
        return event

    def _on_probe_done(self, breaker: CircuitBreaker, permit: Permit) -> None:
        if self._sync is not None and permit.lease is not None:
            self._sync.free_probe(breaker.name, permit.lease)

    async def lease_probe(self, breaker: CircuitBreaker, permit: Permit) -> bool:
        """For a probe permit: take a fleet-wide probe slot (one bounded round trip).

        False means another instance is probing: `permit` was handed back and the call must be
        rejected. In memory, or with Redis unreachable, the breaker's own limit decides: True.
        """
        if self._sync is None:
            return True
        return await self._sync.acquire_probe(breaker, permit)

    async def admit_probe(self, breaker: CircuitBreaker, permit: Permit) -> bool:
        """`lease_probe`, and `permit` handed back if the caller is cancelled meanwhile."""
        try:
            leased = await self.lease_probe(breaker, permit)
        except BaseException:
            breaker.release(permit)  # the slot must not stay taken by a request that is gone
            raise
        return leased

    # -- calls -----------------------------------------------------------------------------

    async def admit(self, service: str) -> tuple[CircuitBreaker, Permit]:
        """Leave for one call to `service`: its breaker and a permit, as the middleware admits
        a request (probe slots fleet-wide, the recovery ramp, manual modes). Report the outcome
        with `breaker.record(permit, failed)` or hand it back with `breaker.release(permit)`.

        Raises `CircuitOpenError` while the breaker rejects. A cancelled caller holds nothing.
        """
        breaker = self._breakers.get(service)
        if breaker is None:
            breaker = self._create(service)
            if self._sync is not None:
                # Once per service: a fresh instance should honour a breaker the fleet opened.
                await self._sync.load_first(service)
        permit = breaker.acquire()
        if permit is not None and permit.probe and not await self.admit_probe(breaker, permit):
            permit = None
        if permit is None:
            raise CircuitOpenError(service, breaker.retry_after())
        return breaker, permit

    @overload
    async def call(
        self,
        service: str,
        fn: Callable[..., Awaitable[T]],
        *args: Any,
        ignore: Ignore = (),
        **kwargs: Any,
    ) -> T: ...

    @overload
    async def call(
        self, service: str, fn: Callable[..., T], *args: Any, ignore: Ignore = (), **kwargs: Any
    ) -> T: ...

    async def call(
        self, service: str, fn: Callable[..., Any], *args: Any, ignore: Ignore = (), **kwargs: Any
    ) -> Any:
        """Run `fn(*args, **kwargs)` (sync or async) under the service's breaker.

        Returns its result and re-raises its exception, which counts as a failure unless it
        matches `ignore` (exception types, or a predicate): those count for nothing. Raises
        `CircuitOpenError` without calling `fn` while the breaker rejects. Cancellation counts
        for nothing and frees any probe slot.
        """
        ignored = ignore_rule(ignore)  # a bad `ignore` fails here, not with the call's error
        breaker, permit = await self.admit(service)
        try:
            result = fn(*args, **kwargs)
            if inspect.isawaitable(result):
                result = await result
        except BaseException as exc:
            settle(breaker, permit, exc, ignored)
            raise
        breaker.record(permit, failed=False)
        return result

    @overload
    def protect(self, service: str, *, fallback: None = None, ignore: Ignore = ()) -> Decorator: ...

    @overload
    def protect(
        self, service: str, *, fallback: Callable[P, T], ignore: Ignore = ()
    ) -> FallbackDecorator[P, T]: ...

    def protect(
        self, service: str, *, fallback: Callable[..., Any] | None = None, ignore: Ignore = ()
    ) -> Any:
        """A decorator guarding a sync or async function with the breaker of `service`
        (see `gateway_breaker.protect`): `fallback(*args, **kwargs)` answers while it is open;
        exceptions matching `ignore` pass through and count for nothing."""
        return protect(self, service, fallback=fallback, ignore=ignore)

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the manager was started on (None before `start()`)."""
        return self._loop

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def shared(self) -> bool:
        """Whether this manager shares state through a store (connected or not)."""
        return self._sync is not None

    async def start(self, services: Iterable[str] = ()) -> None:
        """Connect the store and load the configured services (and `services`). Idempotent."""
        # Thousands of breakers made at once would set off the cyclic garbage collector again
        # and again, each time over everything the process holds (1.8 s for 10,000 breakers
        # in a process that already held 250,000 objects, 0.04 s without): it waits until after.
        collecting = gc.isenabled()
        gc.disable()
        try:
            for name in [*self.config.circuit_breaker.services, *services]:
                if name not in self._breakers:
                    self._create(name)
                    if self._started and self._sync is not None:
                        self._sync.track(name)  # started before: fetch it in the background
        finally:
            if collecting:
                gc.enable()
        if self._started:
            return
        self._started = True
        self._loop = asyncio.get_running_loop()
        if self._sync is not None:
            await self._sync.start(list(self._breakers))

    async def aclose(self) -> None:
        """Flush pending writes (bounded) and close the store's connections."""
        if self._sync is not None:
            await self._sync.aclose()

    async def __aenter__(self) -> CircuitBreakerManager:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


_listener_tasks: set[asyncio.Future[object]] = set()


def _run_listener(callback: TransitionCallback, event: TransitionEvent) -> None:
    try:
        result = callback(event)
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            _listener_tasks.add(task)
            task.add_done_callback(_listener_tasks.discard)
    except Exception:
        logger.exception("Circuit breaker transition listener failed (service=%s)", event.service)
