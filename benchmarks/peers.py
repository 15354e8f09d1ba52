"""gateway-breaker next to the Python peers: per-call cost, Redis cost, propagation, probes.

The peers are not dependencies of the package. Install the versions this was measured with:

    .venv/bin/pip install -r benchmarks/requirements-peers.txt
    .venv/bin/python benchmarks/peers.py                  # full run, about 4 minutes
    .venv/bin/python benchmarks/peers.py --smoke          # < 30 s; missing peers are reported
    .venv/bin/python benchmarks/peers.py --json PATH      # also write the figures as JSON

Contenders, each used through the call form its documentation shows, all with 5 consecutive
failures to open, a 1 s open period and (where the library has the notion) 1 half-open call:

- gateway-breaker, in memory and with Redis: `await manager.call("svc", upstream)`.
- pybreaker, in memory and with `CircuitRedisStorage`: sync only (its async path is Tornado's),
  so it wraps the sync `upstream_sync()` and its overhead is measured against a bare sync call;
  its Redis storage uses the sync redis client.
- aiobreaker, in memory and with its `CircuitRedisStorage` (a sync redis client inside an
  async library: every call blocks the event loop on Redis round trips).
- purgatory, in memory and with its `AsyncRedisUnitOfWork` (decorator form).
- interlock-cb, in memory and with `AsyncRedisStorage` (sliding windows; a Lua probe lease;
  polls Redis every `poll_interval` = 1 s). Set to trip on 5 failures out of the last 5 calls.
- c-breaker: listed, but it needs Python >= 3.12 and cannot be installed into this venv.

What is measured, in one run on one machine, on a redis-server this script starts on a free
loopback port (it never touches another Redis) and stops at the end:

a) Overhead on a closed breaker: us per call minus the bare call, median of rounds; contenders
   and the two bare baselines (async and sync) are interleaved in a new random order each
   round. Ratio to gateway-breaker's in-memory overhead with a bootstrap 95% interval.
b) Redis commands per call on a closed breaker (INFO total_commands_processed delta, one
   contender alive at a time), and the background commands per second of an idle instance.
c) Two instances sharing the Redis: instance 1 opens the breaker (5 failures); instance 2
   then calls a working upstream, yielding to the event loop between calls, until it rejects.
   Reported: ms from the opening failure to the rejection, and how many calls instance 2 let
   through meanwhile. Capped at 3 s. The failures start 0.05-1.05 s (random)
   after the instances' first calls, so that they fall at a random phase of a 1 s poll cycle.
   Instance 2 polls either back to back (a saturated instance) or about once a millisecond.
d) Half-open: after instance 1 opened the breaker and the open period has just ended, five
   instances send 20 concurrent calls each to an upstream that is still down (sleeps 200 ms,
   then fails). Counted: calls that reached the upstream (goal: half_open_max_calls = 1).
   "fresh": the five instances are created after the open period ended (a scale-out or
   restart during the incident); "warm": they existed and served a call before the breaker
   opened. Sync libraries run the 100 calls on 100 threads.

Every figure is a ratio, a count or a median of rounds measured in this run: the machine is
noisy, so absolute microseconds are only comparable within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import importlib.util
import random
import shutil
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from importlib import metadata
from pathlib import Path
from typing import Any

import redis
from _common import (
    bootstrap_ratio_ci,
    clean_environment,
    describe,
    finish,
    machine,
    print_table,
    redis_server,
    summary,
    write_json,
)

REQUIREMENTS = "benchmarks/requirements-peers.txt"
FAILURES_TO_OPEN = 5
INSTANCES = 5
CALLS_PER_INSTANCE = 20
PROPAGATION_CAP_SECONDS = 3.0
# How instance 2 polls in c): back to back (a saturated instance; the poller keeps a core busy),
# or one call per loop timer tick of 1 ms (about 1000 calls/s; asyncio's epoll selector rounds
# sleeps up to whole milliseconds, so the elapsed time is resolved to about 1 ms).
PACES = {"back-to-back": 0.0, "1 call/ms": 0.001}
GB_IN_MEMORY = "gateway-breaker (memory)"


@dataclass(frozen=True)
class Settings:
    smoke: bool
    overhead_rounds: int
    batch_seconds: float  # target duration of one timed batch in a)
    command_calls: int  # calls counted in b)
    idle_seconds: float  # idle time over which b)'s background rate is counted
    propagation_rounds: int
    settle_spread: float  # c): the failures start 0.05 s + uniform(0, this) after the first calls
    half_open_rounds: int
    half_open_variants: tuple[str, ...]
    open_seconds: float
    upstream_seconds: float


FULL = Settings(
    smoke=False,
    overhead_rounds=40,
    batch_seconds=0.02,
    command_calls=2_000,
    idle_seconds=3.0,
    propagation_rounds=15,
    settle_spread=1.0,
    half_open_rounds=7,
    half_open_variants=("fresh", "warm"),
    open_seconds=1.0,
    upstream_seconds=0.2,
)
SMOKE = Settings(
    smoke=True,
    overhead_rounds=3,
    batch_seconds=0.003,
    command_calls=200,
    idle_seconds=0.3,
    propagation_rounds=1,
    settle_spread=0.2,
    half_open_rounds=1,
    half_open_variants=("fresh",),
    # Not shorter: pybreaker and aiobreaker store opened_at in whole seconds, so an open period
    # under 1 s can be over as soon as it starts.
    open_seconds=1.0,
    upstream_seconds=0.05,
)


# -- the upstreams ---------------------------------------------------------------------------


class UpstreamError(RuntimeError):
    pass


async def upstream() -> int:
    return 1


def upstream_sync() -> int:
    return 1


async def failing() -> int:
    raise UpstreamError("upstream failed")


def failing_sync() -> int:
    raise UpstreamError("upstream failed")


class SlowDownUpstream:
    """Still down: every call sleeps, then fails. Counts the calls that reached it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.entered = 0
        self._lock = threading.Lock()

    async def call(self) -> int:
        self.entered += 1
        await asyncio.sleep(self.seconds)
        raise UpstreamError("still down")

    def call_sync(self) -> int:
        with self._lock:
            self.entered += 1
        time.sleep(self.seconds)
        raise UpstreamError("still down")


# -- contenders ------------------------------------------------------------------------------


@dataclass
class Ctx:
    port: int | None
    ns: str  # a fresh key namespace: each round starts from a closed breaker
    open_seconds: float

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@dataclass
class Instance:
    """One breaker object (one gateway instance) of a contender."""

    call: Callable[[Callable[[], Any]], Any]  # async contenders: returns an awaitable
    bench: Callable[[int], Any]  # n calls to the working upstream; a coroutine when async
    close: Callable[[], Awaitable[None]]


@dataclass
class Contender:
    name: str
    dist: str  # distribution name, for the version
    module: str  # import name, to tell whether it is installed
    redis: bool
    sync: bool
    form: str
    make: Callable[[Ctx], Awaitable[Instance]]
    rejected: Callable[[], tuple[type[BaseException], ...]]
    status: str = "ok"
    version: str = ""
    results: dict[str, Any] = field(default_factory=dict)


async def _nothing() -> None:
    return None


def _services(ctx: Ctx) -> dict[str, Any]:
    policy = {
        "failure_threshold": FAILURES_TO_OPEN,
        "timeout_seconds": ctx.open_seconds,
        "half_open_max_calls": 1,
    }
    return {"services": {"svc": policy}}


async def make_gateway_breaker(ctx: Ctx, shared: bool) -> Instance:
    from gateway_breaker import CircuitBreakerManager, Config

    if shared:
        config = Config(
            redis={"url": ctx.url, "key_prefix": ctx.ns}, circuit_breaker=_services(ctx)
        )
        manager = await CircuitBreakerManager.with_redis(config)
    else:
        manager = CircuitBreakerManager(Config(circuit_breaker=_services(ctx)))
    call = manager.call

    async def guarded(fn: Callable[[], Any]) -> Any:
        return await call("svc", fn)

    async def bench(n: int) -> None:
        for _ in range(n):
            await call("svc", upstream)

    return Instance(guarded, bench, manager.aclose)


async def make_pybreaker(ctx: Ctx, shared: bool) -> Instance:
    import pybreaker

    client = redis.Redis(host="127.0.0.1", port=ctx.port) if shared else None
    storage = (
        pybreaker.CircuitRedisStorage(pybreaker.STATE_CLOSED, client, namespace=ctx.ns)
        if client is not None
        else None
    )
    breaker = pybreaker.CircuitBreaker(
        fail_max=FAILURES_TO_OPEN,
        reset_timeout=ctx.open_seconds,
        state_storage=storage,
        name="svc",
    )
    call = breaker.call

    def bench(n: int) -> None:
        for _ in range(n):
            call(upstream_sync)

    async def close() -> None:
        if client is not None:
            client.close()

    return Instance(call, bench, close)


async def make_aiobreaker(ctx: Ctx, shared: bool) -> Instance:
    import aiobreaker
    from aiobreaker.storage.redis import CircuitRedisStorage

    client = redis.Redis(host="127.0.0.1", port=ctx.port) if shared else None
    storage = (
        CircuitRedisStorage(aiobreaker.CircuitBreakerState.CLOSED, client, namespace=ctx.ns)
        if client is not None
        else None
    )
    breaker = aiobreaker.CircuitBreaker(
        fail_max=FAILURES_TO_OPEN,
        timeout_duration=timedelta(seconds=ctx.open_seconds),
        state_storage=storage,
        name="svc",
    )
    call = breaker.call_async

    async def bench(n: int) -> None:
        for _ in range(n):
            await call(upstream)

    async def close() -> None:
        if client is not None:
            client.close()

    return Instance(call, bench, close)


async def make_purgatory(ctx: Ctx, shared: bool) -> Instance:
    from purgatory import AsyncCircuitBreakerFactory, AsyncRedisUnitOfWork

    uow = AsyncRedisUnitOfWork(ctx.url) if shared else None
    factory = AsyncCircuitBreakerFactory(
        default_threshold=FAILURES_TO_OPEN, default_ttl=ctx.open_seconds, uow=uow
    )
    await factory.initialize()
    # purgatory's Redis keys are "cbr::{circuit}" with no prefix option: namespace the name.
    circuit = f"{ctx.ns}-svc"
    decorate = factory(circuit)
    guarded_upstream = decorate(upstream)

    async def guarded(fn: Callable[[], Any]) -> Any:
        return await decorate(fn)()

    async def bench(n: int) -> None:
        for _ in range(n):
            await guarded_upstream()

    async def close() -> None:
        if uow is not None:
            await uow.contexts.redis.aclose()

    return Instance(guarded, bench, close)


async def make_interlock(ctx: Ctx, shared: bool) -> Instance:
    import redis.asyncio
    from interlock import CircuitBreaker, Config
    from interlock.integrations.redis import AsyncRedisStorage

    config = Config(
        # 5 failures out of the last 5 calls: the same trip rule as the others.
        failure_rate_threshold=1.0,
        minimum_number_of_calls=FAILURES_TO_OPEN,
        window_size=FAILURES_TO_OPEN,
        permitted_calls_in_half_open=1,
        max_concurrent_probes=1,
        wait_duration_in_open=ctx.open_seconds,
    )
    client = redis.asyncio.Redis(host="127.0.0.1", port=ctx.port) if shared else None
    storage = AsyncRedisStorage(client, key_prefix=f"{ctx.ns}:") if client is not None else None
    breaker = CircuitBreaker(name="svc", config=config, storage=storage)
    call = breaker.call_async

    async def bench(n: int) -> None:
        for _ in range(n):
            await call(upstream)

    async def close() -> None:
        if client is not None:
            await breaker.aclose()
            await client.aclose()

    return Instance(call, bench, close)


def _rejections(module: str, *names: str) -> Callable[[], tuple[type[BaseException], ...]]:
    def load() -> tuple[type[BaseException], ...]:
        imported = importlib.import_module(module)
        return tuple(getattr(imported, name) for name in names)

    return load


def contenders() -> list[Contender]:
    def pair(
        name: str,
        dist: str,
        module: str,
        sync: bool,
        form: str,
        make: Callable[[Ctx, bool], Awaitable[Instance]],
        rejected: Callable[[], tuple[type[BaseException], ...]],
        storage: str,
    ) -> list[Contender]:
        return [
            Contender(
                f"{name} (memory)",
                dist,
                module,
                False,
                sync,
                form,
                lambda c: make(c, False),
                rejected,
            ),
            Contender(
                f"{name} ({storage})",
                dist,
                module,
                True,
                sync,
                form,
                lambda c: make(c, True),
                rejected,
            ),
        ]

    return [
        *pair(
            "gateway-breaker",
            "gateway-breaker",
            "gateway_breaker",
            False,
            'await manager.call("svc", upstream)',
            make_gateway_breaker,
            _rejections("gateway_breaker", "CircuitOpenError"),
            "Redis",
        ),
        *pair(
            "pybreaker",
            "pybreaker",
            "pybreaker",
            True,
            "breaker.call(upstream_sync)  [sync only]",
            make_pybreaker,
            _rejections("pybreaker", "CircuitBreakerError"),
            "CircuitRedisStorage",
        ),
        *pair(
            "aiobreaker",
            "aiobreaker",
            "aiobreaker",
            False,
            "await breaker.call_async(upstream)",
            make_aiobreaker,
            _rejections("aiobreaker", "CircuitBreakerError"),
            "CircuitRedisStorage",
        ),
        *pair(
            "purgatory",
            "purgatory",
            "purgatory",
            False,
            "await factory(name)(upstream)()  [decorator]",
            make_purgatory,
            _rejections("purgatory.domain.model", "OpenedState"),
            "AsyncRedisUnitOfWork",
        ),
        *pair(
            "interlock-cb",
            "interlock-cb",
            "interlock",
            False,
            "await breaker.call_async(upstream)",
            make_interlock,
            _rejections("interlock", "CircuitOpenError"),
            "AsyncRedisStorage",
        ),
    ]


def cbreaker_status() -> str:
    """c-breaker has no adapter here: it could not be installed, so none could be tested."""
    if sys.version_info < (3, 12):
        return (
            "n/a (not installable: c-breaker 0.1.6 requires Python >= 3.12, "
            f"this venv runs {sys.version.split()[0]})"
        )
    if importlib.util.find_spec("cbreaker") is None:
        return f"missing (pip install c-breaker; not in {REQUIREMENTS}: needs Python >= 3.12)"
    return "n/a (installed, but no adapter: it could not be tested on the Python 3.11 venv)"


def version_of(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


# -- helpers ---------------------------------------------------------------------------------


async def invoke(c: Contender, inst: Instance, fn: Callable[[], Any], fn_sync: Callable[[], Any]):
    """One call through the contender: the sync function for sync-only libraries."""
    if c.sync:
        return inst.call(fn_sync)
    return await inst.call(fn)


async def open_breaker(c: Contender, inst: Instance) -> None:
    """Failures until the breaker opens (the opening call may raise the library's own error)."""
    rejected = c.rejected()
    for _ in range(FAILURES_TO_OPEN):
        with contextlib.suppress(UpstreamError, *rejected):
            await invoke(c, inst, failing, failing_sync)


async def timed(c: Contender, inst: Instance, n: int) -> float:
    started = time.perf_counter()
    if c.sync:
        inst.bench(n)
    else:
        await inst.bench(n)
    return time.perf_counter() - started


def namespace(tag: str) -> str:
    return f"peers-{tag}-{uuid.uuid4().hex[:8]}"


def commands(client: redis.Redis) -> int:
    return int(client.info("stats")["total_commands_processed"])


# -- a) overhead -----------------------------------------------------------------------------


async def bare_async(n: int) -> None:
    for _ in range(n):
        await upstream()


def bare_sync(n: int) -> None:
    for _ in range(n):
        upstream_sync()


def placeholder(name: str, dist: str, *, shared: bool, sync: bool) -> Contender:
    """A row with nothing to run: the bare baselines, and peers that cannot be measured."""

    async def cannot_make(ctx: Ctx) -> Instance:
        raise RuntimeError(f"{name}: nothing to run")

    return Contender(name, dist, "", shared, sync, "", cannot_make, tuple)


BASE_ASYNC = placeholder("bare await upstream()", "", shared=False, sync=False)
BASE_SYNC = placeholder("bare upstream_sync()", "", shared=False, sync=True)


async def measure_overhead(
    active: list[Contender], port: int | None, settings: Settings
) -> dict[str, Any]:
    ctx = Ctx(port, namespace("overhead"), settings.open_seconds)
    instances: dict[str, tuple[Contender, Instance]] = {}
    for c in active:
        if c.redis and port is None:
            continue
        try:
            instances[c.name] = (c, await c.make(ctx))
        except Exception as exc:  # a peer that breaks is reported, not fatal
            c.results["overhead"] = {"error": repr(exc)}
    instances[BASE_ASYNC.name] = (BASE_ASYNC, Instance(upstream, bare_async, _nothing))
    instances[BASE_SYNC.name] = (BASE_SYNC, Instance(upstream_sync, bare_sync, _nothing))

    # Batch sizes: each timed batch lasts about batch_seconds.
    sizes: dict[str, int] = {}
    for name, (c, inst) in list(instances.items()):
        try:
            await timed(c, inst, 50)  # warm-up (lazy imports, connections, first state load)
            per_call = await timed(c, inst, 200) / 200
        except Exception as exc:  # a peer whose closed-breaker call fails is reported
            c.results["overhead"] = {"error": repr(exc)}
            await inst.close()
            del instances[name]
            continue
        sizes[name] = max(20, min(200_000, int(settings.batch_seconds / max(per_call, 1e-9))))

    per_call_us: dict[str, list[float]] = {name: [] for name in instances}
    rng = random.Random(20261129)
    for _ in range(settings.overhead_rounds):
        gc.collect()
        order = list(instances)
        rng.shuffle(order)
        for name in order:
            c, inst = instances[name]
            per_call_us[name].append(await timed(c, inst, sizes[name]) / sizes[name] * 1e6)
            await asyncio.sleep(0)  # let background tasks (syncs, polls) run between batches

    for _, inst in instances.values():
        await inst.close()

    overhead: dict[str, list[float]] = {}
    for name, (c, _) in instances.items():
        if c in (BASE_ASYNC, BASE_SYNC):
            continue
        base = per_call_us[BASE_SYNC.name if c.sync else BASE_ASYNC.name]
        overhead[name] = [x - b for x, b in zip(per_call_us[name], base, strict=True)]
    out: dict[str, Any] = {
        "baseline_us": {
            "async": summary(per_call_us[BASE_ASYNC.name]),
            "sync": summary(per_call_us[BASE_SYNC.name]),
        },
        "batch_sizes": sizes,
    }
    reference = overhead.get(GB_IN_MEMORY)
    for c in active:
        if c.name not in overhead:
            continue
        entry: dict[str, Any] = {
            "overhead_us": summary(overhead[c.name]),
            "per_call_us": summary(per_call_us[c.name]),
            "baseline": "sync" if c.sync else "async",
        }
        if reference is not None:
            low, high = bootstrap_ratio_ci(overhead[c.name], reference)
            entry["ratio_to_gateway_breaker_memory"] = {
                "value": statistics.median(overhead[c.name]) / statistics.median(reference),
                "ci95": [low, high],
            }
        c.results["overhead"] = entry
    return out


# -- b) Redis commands -----------------------------------------------------------------------


async def measure_commands(c: Contender, port: int, settings: Settings) -> dict[str, Any]:
    client = redis.Redis(port=port)
    inst = await c.make(Ctx(port, namespace("commands"), settings.open_seconds))
    try:
        await timed(c, inst, 50)
        await asyncio.sleep(0.2)
        before = commands(client)
        elapsed = await timed(c, inst, settings.command_calls)
        per_call = (commands(client) - before - 1) / settings.command_calls
        before = commands(client)
        await asyncio.sleep(settings.idle_seconds)
        idle_per_second = (commands(client) - before - 1) / settings.idle_seconds
    finally:
        await inst.close()
        client.close()
    return {
        "commands_per_call": per_call,
        "calls": settings.command_calls,
        "seconds": elapsed,
        "idle_commands_per_second": idle_per_second,
    }


# -- c) propagation --------------------------------------------------------------------------


async def propagation_round(
    c: Contender, port: int, settings: Settings, settle: float, pace: float
) -> dict[str, Any]:
    ctx = Ctx(port, namespace("propagation"), settings.open_seconds)
    one = await c.make(ctx)
    two = await c.make(ctx)
    rejected = c.rejected()
    try:
        await invoke(c, one, upstream, upstream_sync)
        await invoke(c, two, upstream, upstream_sync)
        # A random wait of 0.05-1.05 s before the failures: a breaker opens at a random phase of
        # any 1 s poll cycle (interlock-cb's lane, gateway-breaker's re-read) that started with
        # the instance, as it would in a running fleet.
        await asyncio.sleep(settle)
        await open_breaker(c, one)
        started = time.perf_counter()
        through = 0
        while True:
            try:
                await invoke(c, two, upstream, upstream_sync)
            except rejected:
                return {"ms": (time.perf_counter() - started) * 1000, "through": through}
            through += 1
            if time.perf_counter() - started > PROPAGATION_CAP_SECONDS:
                return {"ms": None, "through": through}
            await asyncio.sleep(pace)
    finally:
        await one.close()
        await two.close()


# -- d) half-open ----------------------------------------------------------------------------


async def half_open_round(
    c: Contender, port: int, settings: Settings, variant: str
) -> dict[str, Any]:
    ctx = Ctx(port, namespace("halfopen"), settings.open_seconds)
    opener = await c.make(ctx)
    fleet: list[Instance] = []
    rejected = c.rejected()
    try:
        if variant == "warm":
            fleet = [await c.make(ctx) for _ in range(INSTANCES)]
            for inst in fleet:
                await invoke(c, inst, upstream, upstream_sync)
        await invoke(c, opener, upstream, upstream_sync)
        await open_breaker(c, opener)
        await asyncio.sleep(settings.open_seconds + 0.05)  # the open period has just ended
        if variant == "fresh":
            fleet = [await c.make(ctx) for _ in range(INSTANCES)]
        down = SlowDownUpstream(settings.upstream_seconds)
        total = INSTANCES * CALLS_PER_INSTANCE
        if c.sync:
            barrier = threading.Barrier(total)

            def one_call(inst: Instance) -> BaseException | None:
                barrier.wait(10)
                try:
                    inst.call(down.call_sync)
                except BaseException as exc:
                    return exc
                return None

            loop = asyncio.get_running_loop()
            with ThreadPoolExecutor(max_workers=total) as pool:
                outcomes = await asyncio.gather(
                    *(
                        loop.run_in_executor(pool, one_call, inst)
                        for inst in fleet
                        for _ in range(CALLS_PER_INSTANCE)
                    )
                )
        else:
            outcomes = await asyncio.gather(
                *(inst.call(down.call) for inst in fleet for _ in range(CALLS_PER_INSTANCE)),
                return_exceptions=True,
            )
        # Every call either reached the upstream (UpstreamError, or the library's own error for
        # a failed trial) or was rejected; anything else is a fault of the harness or the peer.
        unexpected = [
            repr(o)
            for o in outcomes
            if o is not None and not isinstance(o, (UpstreamError, *rejected))
        ]
        return {
            "reached_upstream": down.entered,
            "calls": total,
            "unexpected": len(unexpected),
            "unexpected_sample": unexpected[:3],
        }
    finally:
        for inst in [opener, *fleet]:
            await inst.close()


# -- run -------------------------------------------------------------------------------------


async def run(
    active: list[Contender], port: int | None, settings: Settings, no_redis: str
) -> dict[str, Any]:
    overhead = await measure_overhead(active, port, settings)
    shared = [c for c in active if c.redis]
    if port is None:
        for c in shared:
            c.status = no_redis
        return {"overhead": overhead}
    rng = random.Random(11292026)

    for c in shared:
        try:
            c.results["commands"] = await measure_commands(c, port, settings)
        except Exception as exc:
            c.results["commands"] = {"error": repr(exc)}

    rounds: dict[str, dict[str, list[dict[str, Any]]]] = {
        c.name: {pace: [] for pace in PACES} for c in shared
    }
    runs = [(c, pace) for c in shared for pace in PACES]
    for _ in range(settings.propagation_rounds):
        for c, pace in rng.sample(runs, len(runs)):
            try:
                settle = 0.05 + settings.settle_spread * rng.random()
                rounds[c.name][pace].append(
                    await propagation_round(c, port, settings, settle, PACES[pace])
                )
            except Exception as exc:
                c.results["propagation_error"] = repr(exc)
    for c in shared:
        c.results["propagation"] = rounds[c.name]

    for variant in settings.half_open_variants:
        trials: dict[str, list[dict[str, Any]]] = {c.name: [] for c in shared}
        for _ in range(settings.half_open_rounds):
            for c in rng.sample(shared, len(shared)):
                try:
                    trials[c.name].append(await half_open_round(c, port, settings, variant))
                except Exception as exc:
                    c.results[f"half_open_{variant}_error"] = repr(exc)
        for c in shared:
            c.results[f"half_open_{variant}"] = trials[c.name]
    return {"overhead": overhead}


# -- report ----------------------------------------------------------------------------------


def fmt(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}f}"


def median_range(values: Sequence[float], digits: int = 0) -> str:
    if not values:
        return "n/a"
    return (
        f"{fmt(statistics.median(values), digits)} "
        f"[{fmt(min(values), digits)}-{fmt(max(values), digits)}]"
    )


def overhead_row(c: Contender) -> list[str]:
    if c.status != "ok":
        return [c.name, c.version, c.form, c.status, ""]
    entry = c.results.get("overhead")
    if entry is None:
        return [c.name, c.version, c.form, "n/a (not measured)", ""]
    if "error" in entry:
        return [c.name, c.version, c.form, f"error: {entry['error']}", ""]
    o = entry["overhead_us"]
    cell = f"{fmt(o['median'])} [{fmt(o['p25'])}-{fmt(o['p75'])}]"
    ratio = entry.get("ratio_to_gateway_breaker_memory")
    rcell = ""
    if ratio is not None:
        low, high = ratio["ci95"]
        rcell = f"{fmt(ratio['value'])}x [{fmt(low)}-{fmt(high)}]"
    return [c.name, c.version, c.form, cell, rcell]


def fleet_row(c: Contender, variants: Sequence[str]) -> list[str]:
    width = 1 + 2 * len(PACES) + len(variants)
    if c.status != "ok":
        return [c.name, c.status, *["n/a"] * width]
    if not c.redis:
        return [c.name, "n/a (in memory only: no shared state)", *["n/a"] * width]
    r = c.results
    cmd = r.get("commands", {})
    if "error" in cmd:
        cells = [f"error: {cmd['error']}", ""]
    else:
        cells = [fmt(cmd["commands_per_call"], 3), fmt(cmd["idle_commands_per_second"], 1)]
    for pace in PACES:
        rounds = r.get("propagation", {}).get(pace, [])
        reached = [x["ms"] for x in rounds if x["ms"] is not None]
        capped = len(rounds) - len(reached)
        ms = median_range(reached, 1) if reached else "n/a"
        if capped:
            ms += f"; {capped}/{len(rounds)} rounds > {PROPAGATION_CAP_SECONDS:.0f} s (cap)"
        if "propagation_error" in r:
            ms += f"; error: {r['propagation_error']}"
        cells += [ms, median_range([x["through"] for x in rounds])]
    for variant in variants:
        trials = r.get(f"half_open_{variant}", [])
        cell = median_range([x["reached_upstream"] for x in trials])
        odd = sum(x["unexpected"] for x in trials)
        if odd:
            cell += f"; {odd} unexpected errors"
        if f"half_open_{variant}_error" in r:
            cell += f"; error: {r[f'half_open_{variant}_error']}"
        cells.append(cell)
    return [c.name, *cells]


def report(all_: list[Contender], settings: Settings, info: dict[str, Any]) -> None:
    print(
        f"\n{info['date']}  nproc={info['nproc']}  {info['cpu_model']}  Python {info['python']}"
        f"  redis-server {info['redis_server']}  gateway-breaker {describe(info)}"
    )
    print(f"load average at start {info['loadavg']}, at end {info.get('loadavg_end')}")
    print(
        f"\na) overhead on a closed breaker, us per call minus the bare call (median [p25-p75]"
        f" of {settings.overhead_rounds} rounds)"
    )
    base = info.get("baseline_us")
    if base:
        print(
            f"   bare call: await upstream() {fmt(base['async']['median'], 3)} us,"
            f" upstream_sync() {fmt(base['sync']['median'], 3)} us"
        )
    print_table(
        ["contender", "version", "call form", "overhead us/call", "ratio to gb memory [95% CI]"],
        [overhead_row(c) for c in all_],
    )
    variants = settings.half_open_variants
    print(
        f"\nb) Redis commands; c) instance 2 after instance 1 opened (cap "
        f"{PROPAGATION_CAP_SECONDS:.0f} s); d) calls reaching a down upstream in the half-open"
        f" window, {INSTANCES} instances x {CALLS_PER_INSTANCE} concurrent calls (goal 1)."
        f" Medians [min-max] of rounds: c) {settings.propagation_rounds},"
        f" d) {settings.half_open_rounds} per variant."
    )
    print_table(
        [
            "contender",
            "b) cmds/closed call",
            "b) idle cmds/s",
            *[h for pace in PACES for h in (f"c) ms, {pace}", f"c) let through, {pace}")],
            *[f"d) trials, {v} instances" for v in variants],
        ],
        [fleet_row(c, variants) for c in all_],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny run, < 30 s")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    clean_environment()
    settings = SMOKE if args.smoke else FULL

    all_ = contenders()
    for c in all_:
        c.version = version_of(c.dist)
        if importlib.util.find_spec(c.module) is None:
            c.status = f"missing (pip install -r {REQUIREMENTS})"
    cbreaker = placeholder("c-breaker (Redis)", "c-breaker", shared=True, sync=False)
    cbreaker.version = version_of("c-breaker")
    cbreaker.status = cbreaker_status()
    all_.append(cbreaker)
    active = [c for c in all_ if c.status == "ok"]

    # Import every module of the package now, so that what runs is what the digest in `info`
    # describes even if the source changes during the run (finish() warns when it does).
    for module in ("gateway_breaker", "gateway_breaker.sync", "gateway_breaker.store.redis"):
        importlib.import_module(module)
    info = machine()
    have_redis = shutil.which("redis-server") is not None
    info["redis_server"] = "not found"
    info["peers"] = {c.dist: c.version for c in all_}
    info["peers"]["redis (client)"] = version_of("redis")
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        port: int | None = None
        no_redis = "n/a (no redis-server on PATH)"
        if have_redis:
            try:
                port = stack.enter_context(redis_server())
                probe = redis.Redis(port=port)
                info["redis_server"] = probe.info("server")["redis_version"]
                probe.close()
            except (OSError, redis.RedisError) as exc:
                no_redis = f"n/a (redis-server did not start: {exc!r})"
        extra = asyncio.run(run(active, port, settings, no_redis))
    info["baseline_us"] = extra["overhead"]["baseline_us"]
    info["seconds"] = time.monotonic() - started
    finish(info)
    report(all_, settings, info)

    if args.json:
        write_json(
            str(args.json),
            {
                "machine": info,
                "settings": dataclasses.asdict(settings),
                "contenders": {
                    c.name: {
                        "dist": c.dist,
                        "version": c.version,
                        "status": c.status,
                        "redis": c.redis,
                        "sync_only": c.sync,
                        "form": c.form,
                        **c.results,
                    }
                    for c in all_
                },
                "batch_sizes": extra["overhead"]["batch_sizes"],
            },
        )


if __name__ == "__main__":
    main()
