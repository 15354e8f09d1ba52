"""Guarding calls a service makes itself: `@manager.protect`, and the `ignore` rule it shares
with `manager.call`.

Both admit a call the way the middleware admits a request (`manager.admit`: probe slots,
the recovery ramp, manual modes), then report its outcome to the breaker. Exceptions matching
`ignore` pass through and count for nothing, as does a cancelled call.

A sync function stays sync. The breakers are in-memory state machines, so a sync call needs no
I/O to be admitted or counted, with one exception: the fleet-wide probe lease of a half-open
breaker is one Redis round trip, taken on the manager's event loop. Called from another thread
(FastAPI runs sync endpoints in a thread pool), the call is admitted on that loop and waits for
it; its outcome is handed to the loop too, so a breaker is only ever touched by one thread.
Called on the loop's own thread (which must not block), a probe needing the fleet's lease is
left to the next async caller: the sync call is rejected as if the slot were taken.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeAlias, TypeVar, cast, overload

from gateway_breaker.breaker import CircuitBreaker, Permit
from gateway_breaker.errors import CircuitOpenError

if TYPE_CHECKING:
    from gateway_breaker.manager import CircuitBreakerManager

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")
logger = logging.getLogger("gateway_breaker")

Ignore: TypeAlias = (
    type[BaseException] | tuple[type[BaseException], ...] | Callable[[BaseException], bool]
)
"""Exceptions that count for nothing: a type, a tuple of types, or a predicate."""


class Decorator(Protocol):
    """What `protect` returns without a fallback: the function's type is kept."""

    def __call__(self, fn: Callable[P, R], /) -> Callable[P, R]: ...


class FallbackDecorator(Protocol[P, T]):
    """What `protect` returns with a fallback answering `T`: for a function of the same
    parameters answering `T`, or an async one answering `T` (a sync fallback is fine there)."""

    @overload
    def __call__(
        self, fn: Callable[P, Coroutine[Any, Any, T]], /
    ) -> Callable[P, Coroutine[object, None, T]]: ...

    @overload
    def __call__(self, fn: Callable[P, T], /) -> Callable[P, T]: ...


# A sync call from another thread waits this long at most for the loop to admit it (the
# admission itself is bounded far below this: a first fetch and a probe lease).
ADMIT_WAIT_SECONDS = 30.0


def _never(exc: BaseException) -> bool:
    return False


def ignore_rule(ignore: Ignore) -> Callable[[BaseException], bool]:
    """`ignore` as a predicate. Raises TypeError naming `ignore` for anything else."""
    if ignore == ():
        return _never
    if isinstance(ignore, type):
        ignore = (ignore,)
    if isinstance(ignore, tuple):
        if not all(isinstance(kind, type) and issubclass(kind, BaseException) for kind in ignore):
            raise TypeError("ignore: expected exception types or a predicate")
        kinds = ignore
        return lambda exc: isinstance(exc, kinds)
    if callable(ignore):
        return ignore
    raise TypeError("ignore: expected exception types or a predicate")


def settle(
    breaker: CircuitBreaker,
    permit: Permit,
    error: BaseException | None,
    ignored: Callable[[BaseException], bool] = _never,
) -> None:
    """Report how a permitted call ended: success, failure, or nothing (ignored, cancelled)."""
    if error is None:
        breaker.record(permit, failed=False)
        return
    if isinstance(error, Exception):
        try:
            skip = ignored(error)
        except Exception:
            logger.exception("ignore predicate failed (service=%s)", breaker.name)
            skip = False
        if not skip:
            breaker.record(permit, failed=True)
            return
    breaker.release(permit)  # cancelled, interrupted or ignored: says nothing of the service


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def admit_sync(
    manager: CircuitBreakerManager, service: str
) -> tuple[CircuitBreaker, Permit, asyncio.AbstractEventLoop | None]:
    """`manager.admit` for sync code: the breaker, a permit, and the loop that must receive
    the outcome (None: settle it here). Raises `CircuitOpenError` while the breaker rejects."""
    loop = manager.loop
    if loop is not None and loop.is_running() and _running_loop() is not loop:
        future = asyncio.run_coroutine_threadsafe(manager.admit(service), loop)
        try:
            admitted = future.result(ADMIT_WAIT_SECONDS)
        except TimeoutError:
            future.cancel()  # a cancelled admission holds nothing
            raise
        return admitted[0], admitted[1], loop
    breaker = manager.get(service)
    permit: Permit | None = breaker.acquire()
    if permit is not None and permit.probe and manager.store_up and not breaker.local:
        breaker.refuse(permit)  # the fleet's probe lease needs an await this thread cannot make
        permit = None
    if permit is None:
        raise CircuitOpenError(service, breaker.retry_after())
    return breaker, permit, None


def settle_from(
    loop: asyncio.AbstractEventLoop | None,
    breaker: CircuitBreaker,
    permit: Permit,
    error: BaseException | None,
    ignored: Callable[[BaseException], bool],
) -> None:
    """`settle` on the thread that owns the breaker."""
    if loop is not None:
        try:
            loop.call_soon_threadsafe(settle, breaker, permit, error, ignored)
            return
        except RuntimeError:
            pass  # the loop closed meanwhile: nobody else touches the breaker now
    settle(breaker, permit, error, ignored)


@overload
def protect(
    manager: CircuitBreakerManager, service: str, *, fallback: None = None, ignore: Ignore = ()
) -> Decorator: ...


@overload
def protect(
    manager: CircuitBreakerManager,
    service: str,
    *,
    fallback: Callable[P, T],
    ignore: Ignore = (),
) -> FallbackDecorator[P, T]: ...


def protect(
    manager: CircuitBreakerManager,
    service: str,
    *,
    fallback: Callable[..., Any] | None = None,
    ignore: Ignore = (),
) -> Any:
    """A decorator: the function runs under the breaker of `service`.

    While the breaker rejects, `fallback(*args, **kwargs)` answers (an async function's
    fallback may be sync or async), or `CircuitOpenError` is raised when there is none.
    Exceptions matching `ignore` pass through and count for nothing; other exceptions are
    failures. The wrapped function keeps its name, docstring and signature.
    """
    ignored = ignore_rule(ignore)

    def decorate(fn: Callable[P, Any]) -> Callable[P, Any]:
        # Also an object whose __call__ is async.
        if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__):
            run = cast("Callable[P, Awaitable[Any]]", fn)

            @functools.wraps(fn)
            async def guarded_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                try:
                    breaker, permit = await manager.admit(service)
                except CircuitOpenError:
                    if fallback is None:
                        raise
                    result = fallback(*args, **kwargs)
                    return (await result) if inspect.isawaitable(result) else result
                try:
                    result = await run(*args, **kwargs)
                except BaseException as exc:
                    settle(breaker, permit, exc, ignored)
                    raise
                breaker.record(permit, failed=False)
                return result

            return guarded_async

        @functools.wraps(fn)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> Any:
            try:
                breaker, permit, loop = admit_sync(manager, service)
            except CircuitOpenError:
                if fallback is None:
                    raise
                return fallback(*args, **kwargs)
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                settle_from(loop, breaker, permit, exc, ignored)
                raise
            settle_from(loop, breaker, permit, None, ignored)
            return result

        return guarded

    return decorate
