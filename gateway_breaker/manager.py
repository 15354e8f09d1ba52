"""CircuitBreakerManager: one breaker per service, `call()`, and the wiring to a state store."""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar, overload

from gateway_breaker.breaker import CircuitBreaker, CircuitState, Clock, Permit
from gateway_breaker.config import Config, check_service_name
from gateway_breaker.errors import CircuitOpenError, ConfigError

if TYPE_CHECKING:
    from gateway_breaker.store.base import StateStore
    from gateway_breaker.sync import StateSync

T = TypeVar("T")
logger = logging.getLogger("gateway_breaker")


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
    ) -> None:
        self.config = config if config is not None else Config()
        self._clock = clock
        self._breakers: dict[str, CircuitBreaker] = {}
        self._sync: StateSync | None = None
        if store is not None:
            from gateway_breaker.sync import StateSync

            self._sync = StateSync(store, self, self.config.redis)
        self._started = False

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
        }
        if self._clock is not None:
            kwargs["clock"] = self._clock
        breaker = CircuitBreaker(service, self.config.policy(service), **kwargs)
        self._breakers[service] = breaker
        return breaker

    def _on_transition(self, breaker: CircuitBreaker, previous: CircuitState) -> None:
        logger.debug(
            "Circuit breaker transition (service=%s, from=%s, to=%s, failure_count=%d)",
            breaker.name,
            previous.value,
            breaker.state.value,
            breaker.failure_count,
        )
        if self._sync is not None:
            self._sync.mark_dirty(breaker.name)

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

    @overload
    async def call(
        self, service: str, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any
    ) -> T: ...

    @overload
    async def call(self, service: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T: ...

    async def call(self, service: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run `fn(*args, **kwargs)` (sync or async) under the service's breaker.

        Returns its result and re-raises its exception, which counts as a failure. Raises
        `CircuitOpenError` without calling `fn` while the breaker rejects. Cancellation counts
        for nothing and frees any probe slot.
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
        try:
            result = fn(*args, **kwargs)
            if inspect.isawaitable(result):
                result = await result
        except Exception:
            breaker.record(permit, failed=True)
            raise
        else:
            breaker.record(permit, failed=False)
            return result
        finally:
            breaker.release(permit)  # no-op once recorded; frees the slot on cancellation

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def shared(self) -> bool:
        """Whether this manager shares state through a store (connected or not)."""
        return self._sync is not None

    async def start(self, services: Iterable[str] = ()) -> None:
        """Connect the store and load the configured services (and `services`). Idempotent."""
        for name in [*self.config.circuit_breaker.services, *services]:
            if name not in self._breakers:
                self._create(name)
                if self._started and self._sync is not None:
                    self._sync.track(name)  # started before: fetch it in the background
        if self._started:
            return
        self._started = True
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
