"""Startup restore: how long a new instance takes to adopt N breaker states stored in Redis.

For N = 10, 100, 1000 and 10000 services, the script writes N open states in the seed's format
straight into a redis-server it starts on a free loopback port (never 127.0.0.1:6379):

    circuit_breaker:svc{i}:state = {"state":"open","failure_count":5,"success_count":0,
        "last_failure_time":T,"opened_at":T,"opened_at_ms":T*1000,"version":1}   (T = now)

with a pipeline, then times `await CircuitBreakerManager.with_redis(config)` for a config that
lists the N services, until every breaker is OPEN. The config is built before the clock starts
(pydantic validation of N services is the config's cost, not the restore's). Sizes run in a
shuffled order in each round; the figures are medians over the rounds.

Also measured for each restore: the Redis commands it sent (INFO commandstats delta) and its
round trips (a write to a Redis socket followed by a read, counted by wrapping redis-py's
connection methods in this process: the package is not changed). Then, once per size, the
memory the manager keeps after the restore (tracemalloc, in a separate run because tracing slows
everything down), and the bytes Redis stores per service (STRLEN, MEMORY USAGE, and the
used_memory delta of seeding 10000 keys).

Goals: restoring 10000 services takes <= 1 s; it takes one or a few round trips whatever N
(counted: the package's own, <= 3; redis-py's connection handshake is listed apart).

With --profile, for the largest N: the parts of a restore timed apart (creating the breakers,
the MGET alone, decoding, adopting), a whole restore with the cyclic GC on and off, the CPU an
idle manager then spends on its periodic re-read of every state, and a cProfile.

Run:  .venv/bin/python benchmarks/restore.py [--rounds N] [--profile] [--json PATH]
CI:   .venv/bin/python benchmarks/restore.py --smoke
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import io
import json
import pstats
import random
import shutil
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections import Counter
from typing import Any

import redis
from _common import (
    clean_environment,
    describe,
    finish,
    machine,
    print_table,
    redis_server,
    summary,
    write_json,
)
from redis import asyncio as aioredis
from redis.asyncio.connection import AbstractConnection

from gateway_breaker import CircuitBreakerManager, CircuitState, Config
from gateway_breaker.store.redis import RedisStateStore

SIZES = (10, 100, 1_000, 10_000)
SMOKE_SIZES = (10, 1_000)
GOAL_SECONDS = 1.0  # restoring the largest size: at most this
# Round trips the package itself makes (TIME, MGET, scripts...: all but redis-py opening its
# connection), whatever N: at most this.
GOAL_DATA_ROUND_TRIPS = 3
KEY_PREFIX = "circuit_breaker"
SEED_BATCH = 1_000
# Commands redis-py sends when it opens a connection (not the package's choice).
HANDSHAKE = {"client|setname", "client|setinfo", "hello", "auth", "select", "ping"}


# -- the server ------------------------------------------------------------------------------


# -- counting round trips --------------------------------------------------------------------


class RoundTrips:
    """Records the round trips of every redis-py asyncio connection of this process.

    A round trip is one or more writes to a socket followed by a read of a reply: a pipeline of
    TIME and MGET is one, whatever the number of keys. The wrappers keep a reference to what was
    written (decoded after the timing, so that it costs nothing measurable) and then call the
    original methods.
    """

    def __init__(self) -> None:
        self.trips: list[list[Any]] = []
        self._pending: dict[int, list[Any]] = {}
        self._send = AbstractConnection.send_packed_command
        self._read = AbstractConnection.read_response

    def reset(self) -> None:
        self.trips = []
        self._pending = {}

    def install(self) -> None:
        recorder = self
        send, read = self._send, self._read

        async def send_packed_command(conn: Any, command: Any, *args: Any, **kwargs: Any) -> None:
            await send(conn, command, *args, **kwargs)
            recorder._pending.setdefault(id(conn), []).append(command)

        async def read_response(conn: Any, *args: Any, **kwargs: Any) -> Any:
            written = recorder._pending.pop(id(conn), None)
            if written is not None:
                recorder.trips.append(written)
            return await read(conn, *args, **kwargs)

        AbstractConnection.send_packed_command = send_packed_command  # type: ignore[method-assign]
        AbstractConnection.read_response = read_response  # type: ignore[method-assign]

    def uninstall(self) -> None:
        AbstractConnection.send_packed_command = self._send  # type: ignore[method-assign]
        AbstractConnection.read_response = self._read  # type: ignore[method-assign]

    def commands(self) -> list[list[str]]:
        """The command names (`client|setname` for subcommands) sent in each round trip."""
        return [_command_names(written) for written in self.trips]


def _command_names(written: list[Any]) -> list[str]:
    """Names of the RESP commands in what was written to a socket."""
    parts: list[bytes] = []
    for chunk in written:
        for part in chunk if isinstance(chunk, list | tuple) else [chunk]:
            parts.append(part.encode() if isinstance(part, str) else bytes(part))
    data = b"".join(parts)
    names: list[str] = []
    pos = 0
    while pos < len(data) and data[pos : pos + 1] == b"*":
        end = data.index(b"\r\n", pos)
        count, pos = int(data[pos + 1 : end]), end + 2
        args = []
        for _ in range(count):
            end = data.index(b"\r\n", pos)
            size = int(data[pos + 1 : end])
            args.append(data[end + 2 : end + 2 + size])
            pos = end + 2 + size + 2
        name = args[0].decode().lower()
        if name in {"client", "config", "memory", "script"} and len(args) > 1:
            name += "|" + args[1].decode().lower()
        names.append(name)
    return names


# -- seeding ---------------------------------------------------------------------------------


def state_key(service: str) -> str:
    return f"{KEY_PREFIX}:{service}:state"


def seed_value(t: int) -> str:
    doc = {
        "state": "open",
        "failure_count": 5,
        "success_count": 0,
        "last_failure_time": t,
        "opened_at": t,
        "opened_at_ms": t * 1000,
        "version": 1,
    }
    return json.dumps(doc, separators=(",", ":"))


def seed(client: redis.Redis, n: int) -> None:
    """FLUSHDB, then N open states in the seed's format (TTL as the package sets it)."""
    client.flushdb()
    value = seed_value(int(time.time()))
    for start in range(0, n, SEED_BATCH):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(n, start + SEED_BATCH)):
            pipe.set(state_key(f"svc{i}"), value, ex=3600)
        pipe.execute()
    if client.dbsize() != n:
        raise AssertionError(f"seeded {client.dbsize()} keys, expected {n}")


def make_config(port: int, n: int) -> Config:
    return Config(
        redis={"url": f"redis://127.0.0.1:{port}/0"},
        circuit_breaker={"services": {f"svc{i}": {} for i in range(n)}},
    )


def command_stats(client: redis.Redis) -> Counter[str]:
    """Calls per command so far, INFO itself left out."""
    stats = client.info("commandstats")
    calls = Counter({k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()})
    del calls["info"]
    return calls


# -- one restore -----------------------------------------------------------------------------


async def restore_once(
    config: Config, n: int, client: redis.Redis, trips: RoundTrips
) -> dict[str, Any]:
    """Time `with_redis(config)` until all N breakers are OPEN; count commands and trips."""
    before = command_stats(client)
    trips.reset()
    gc.collect()
    started = time.perf_counter()
    manager = await CircuitBreakerManager.with_redis(config)
    returned = time.perf_counter() - started
    # Blocking calls: the event loop does not run meanwhile, so the manager's background tasks
    # (the event subscription, the periodic re-read) have not sent anything yet.
    written = list(trips.trips)
    sent = command_stats(client) - before
    try:
        breakers = manager.breakers()
        open_at_return = sum(b.state is CircuitState.OPEN for b in breakers.values())
        deadline = time.monotonic() + 10
        while sum(b.state is CircuitState.OPEN for b in breakers.values()) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"only {open_at_return} of {n} breakers open after 10 s")
            await asyncio.sleep(0.001)
        all_open = time.perf_counter() - started
        if len(breakers) != n:
            raise AssertionError(f"{len(breakers)} breakers, expected {n}")
    finally:
        await manager.aclose()
    trips.trips = written
    round_trips = trips.commands()
    data_trips = [t for t in round_trips if not set(t) <= HANDSHAKE]
    return {
        "seconds": all_open,
        "seconds_to_return": returned,
        "open_at_return": open_at_return,
        "commands": sum(sent.values()),
        "commands_by_name": dict(sorted(sent.items())),
        "round_trips": len(round_trips),
        "data_round_trips": len(data_trips),
        "round_trip_commands": [" + ".join(t) for t in round_trips],
    }


async def memory_once(config: Config, n: int) -> dict[str, Any]:
    """Bytes the manager keeps after restoring N states, by where they were allocated."""
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        manager = await CircuitBreakerManager.with_redis(config)
        try:
            if any(b.state is not CircuitState.OPEN for b in manager.breakers().values()):
                raise AssertionError("not every breaker was open after the restore")
            gc.collect()
            kept = tracemalloc.get_traced_memory()[0] - base
            snapshot = tracemalloc.take_snapshot()
        finally:
            await manager.aclose()
    finally:
        tracemalloc.stop()
    by_file: Counter[str] = Counter()
    for stat in snapshot.statistics("filename"):
        name = stat.traceback[0].filename
        if "gateway_breaker" in name:
            by_file["gateway_breaker"] += stat.size
        elif "/redis/" in name:
            by_file["redis-py"] += stat.size
        elif "tracemalloc" not in name:
            by_file["other"] += stat.size
    top = [
        {"site": f"{s.traceback[0].filename}:{s.traceback[0].lineno}", "bytes": s.size}
        for s in snapshot.statistics("lineno")[:8]
    ]
    return {
        "bytes_kept": kept,
        "bytes_per_breaker": kept / n,
        "package_bytes_per_breaker": by_file["gateway_breaker"] / n,
        "by_origin": dict(by_file),
        "top_sites": top,
    }


# -- where the time goes (--profile) ---------------------------------------------------------


async def phases_once(config: Config, n: int) -> dict[str, float]:
    """Seconds of each part of a restore, timed apart with the package's public pieces."""
    names = list(config.circuit_breaker.services)
    url = str(config.redis.url)
    started = time.perf_counter()
    manager = CircuitBreakerManager(config)  # in memory: start() only creates the breakers
    await manager.start()
    create = time.perf_counter() - started

    client = aioredis.Redis.from_url(url)
    await client.ping()
    started = time.perf_counter()
    raw = await client.mget([state_key(s) for s in names])
    mget = time.perf_counter() - started
    await client.aclose()
    if sum(v is not None for v in raw) != n:
        raise AssertionError("the seeded states are not all there")

    store = RedisStateStore(config.redis)
    await store.connect()
    started = time.perf_counter()
    snapshots = await store.load(names)
    load = time.perf_counter() - started
    await store.aclose()

    breakers = manager.breakers()
    started = time.perf_counter()
    for name in names:
        breakers[name].restore(snapshots[name])
    adopt = time.perf_counter() - started
    return {
        "create_breakers": create,
        "mget_alone": mget,
        "store_load": load,
        "decode_and_shift": max(0.0, load - mget),
        "adopt": adopt,
    }


async def idle_cost(config: Config, seconds: float) -> float:
    """CPU share of this process while a restored manager sits idle (its periodic re-read)."""
    manager = await CircuitBreakerManager.with_redis(config)
    try:
        await asyncio.sleep(1.5)  # past the first re-read
        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.sleep(seconds)
        return (time.process_time() - cpu) / (time.perf_counter() - wall)
    finally:
        await manager.aclose()


def mget_stats(client: redis.Redis) -> tuple[int, int]:
    stats = client.info("commandstats").get("cmdstat_mget", {})
    return int(stats.get("calls", 0)), int(stats.get("usec", 0))


def profile(port: int, n: int, client: redis.Redis, rounds: int) -> dict[str, Any]:
    config = make_config(port, n)
    seed(client, n)
    samples = []
    for _ in range(rounds):  # the work alone: the collector's share is timed below
        gc.collect()
        gc.disable()
        try:
            samples.append(asyncio.run(phases_once(config, n)))
        finally:
            gc.enable()
    parts = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
    print(f"\nwhere the time goes, {n} services (median of {rounds}; parts timed with GC off):")
    for k, v in parts.items():
        print(f"  {k:18} {v * 1000:7.1f} ms  {v / n * 1e6:6.2f} us/service")

    # The collector's share: the same restore with the cyclic GC off, interleaved with it on.
    with_gc, without_gc = [], []
    for _ in range(rounds):
        for enabled, into in ((True, with_gc), (False, without_gc)):
            seed(client, n)
            gc.collect()
            if not enabled:
                gc.disable()
            try:
                into.append(asyncio.run(restore_once(config, n, client, RoundTrips()))["seconds"])
            finally:
                gc.enable()
    gc_share = {"gc_on": statistics.median(with_gc), "gc_off": statistics.median(without_gc)}
    print(
        f"  restore, GC on     {gc_share['gc_on'] * 1000:7.1f} ms\n"
        f"  restore, GC off    {gc_share['gc_off'] * 1000:7.1f} ms"
    )

    # Afterwards: every sync_interval_seconds the manager re-reads and decodes every state.
    seed(client, n)
    calls, usec = mget_stats(client)
    idle = asyncio.run(idle_cost(config, 5.0))
    calls, usec = (a - b for a, b in zip(mget_stats(client), (calls, usec), strict=True))
    idle_result = {
        "cpu_share": idle,
        "sync_interval_seconds": config.redis.sync_interval_seconds,
        "redis_usec_per_mget": usec / calls if calls else 0.0,
    }
    print(
        f"  idle after restore {idle * 100:5.1f}% of a core (the re-read every"
        f" {config.redis.sync_interval_seconds:g} s; Redis {idle_result['redis_usec_per_mget']:.0f}"
        " us per MGET)"
    )

    async def restore_profiled() -> cProfile.Profile:
        profiler = cProfile.Profile()
        profiler.enable()
        manager = await CircuitBreakerManager.with_redis(config)
        profiler.disable()
        await manager.aclose()
        return profiler

    seed(client, n)
    out = io.StringIO()
    stats = pstats.Stats(asyncio.run(restore_profiled()), stream=out)
    stats.sort_stats("tottime").print_stats(15)
    print(f"cProfile of one with_redis() of {n} (own time; the profiler inflates it):")
    print("\n".join(line for line in out.getvalue().splitlines()[6:] if line.strip()))
    return {
        "services": n,
        "seconds": parts,
        "restore_gc_on_off": gc_share,
        "idle": idle_result,
        "cprofile_top": out.getvalue(),
    }


# -- storage ---------------------------------------------------------------------------------


async def package_written_value(port: int) -> str:
    """The JSON the package itself stores for an open breaker (its Lua write adds version)."""
    config = Config(
        redis={"url": f"redis://127.0.0.1:{port}/0"},
        circuit_breaker={"services": {"written": {"failure_threshold": 1}}},
    )
    manager = await CircuitBreakerManager.with_redis(config)

    def fail() -> None:
        raise RuntimeError("upstream failed")

    with contextlib.suppress(RuntimeError):
        await manager.call("written", fail)
    await manager.aclose()  # flushes the pending write
    return state_key("written")


def storage(client: redis.Redis, port: int, n: int) -> dict[str, Any]:
    """Bytes per service in Redis: the value, the key's MEMORY USAGE, and used_memory per key."""
    client.flushdb()
    empty = int(client.info("memory")["used_memory"])
    seed(client, n)
    used = int(client.info("memory")["used_memory"]) - empty
    seeded = state_key("svc0")
    written = asyncio.run(package_written_value(port))
    result: dict[str, Any] = {}
    for name, key in (("seed_format", seeded), ("written_by_package", written)):
        value = client.get(key) or b""
        result[name] = {
            "value": value.decode(),
            "strlen": int(client.strlen(key)),
            "memory_usage": int(client.memory_usage(key) or 0),
            "ttl": int(client.ttl(key)),
        }
    result["used_memory_per_key"] = {"keys": n, "bytes": used / n}
    client.flushdb()
    return result


# -- the run ---------------------------------------------------------------------------------


def run(args: argparse.Namespace, port: int) -> dict[str, Any]:
    sizes = SMOKE_SIZES if args.smoke else SIZES
    client = redis.Redis(host="127.0.0.1", port=port)
    configs = {n: make_config(port, n) for n in sizes}
    samples: dict[int, list[dict[str, Any]]] = {n: [] for n in sizes}
    trips = RoundTrips()
    trips.install()
    rng = random.Random(20261129)
    try:
        # One unmeasured restore per size first: imports, pool classes, code paths warm.
        for n in sizes:
            seed(client, n)
            asyncio.run(restore_once(configs[n], n, client, trips))
        for _ in range(args.rounds):
            order = list(sizes)
            rng.shuffle(order)
            for n in order:
                seed(client, n)
                samples[n].append(asyncio.run(restore_once(configs[n], n, client, trips)))
    finally:
        trips.uninstall()

    restore: dict[str, Any] = {}
    rows = []
    for n in sizes:
        runs = samples[n]
        seconds = summary([r["seconds"] for r in runs])
        last = runs[-1]
        restore[str(n)] = {
            "seconds": seconds,
            "us_per_service": seconds["median"] / n * 1e6,
            "seconds_to_return": summary([r["seconds_to_return"] for r in runs]),
            "open_at_return": min(r["open_at_return"] for r in runs),
            "commands": summary([r["commands"] for r in runs]),
            "commands_by_name": last["commands_by_name"],
            "round_trips": summary([r["round_trips"] for r in runs]),
            "data_round_trips": summary([r["data_round_trips"] for r in runs]),
            "round_trip_commands": last["round_trip_commands"],
        }
        r = restore[str(n)]
        by_name = ", ".join(f"{k} {v}" for k, v in last["commands_by_name"].items())
        rows.append(
            [
                str(n),
                f"{seconds['median'] * 1000:.1f}",
                f"{seconds['p25'] * 1000:.1f} - {seconds['p75'] * 1000:.1f}",
                f"{r['us_per_service']:.1f}",
                f"{r['open_at_return']}/{n}",
                f"{r['commands']['median']:.0f} ({by_name})",
                f"{r['round_trips']['median']:.0f} ({r['data_round_trips']['median']:.0f})",
            ]
        )
    print_table(
        [
            "services",
            "restore ms",
            "p25 - p75 ms",
            "us/service",
            "open at return",
            "commands",
            "round trips (package's own)",
        ],
        rows,
    )
    print("round trips of the last restore of each size:")
    for n in sizes:
        print(f"  {n}: " + " | ".join(restore[str(n)]["round_trip_commands"]))

    memory: dict[str, Any] = {}
    memory_sizes = sizes[-1:] if args.smoke else sizes[1:]
    mem_rows = []
    for n in memory_sizes:
        seed(client, n)
        memory[str(n)] = m = asyncio.run(memory_once(configs[n], n))
        mem_rows.append(
            [
                str(n),
                f"{m['bytes_per_breaker']:.0f}",
                f"{m['package_bytes_per_breaker']:.0f}",
                f"{m['bytes_kept'] / 1024:.0f}",
                ", ".join(f"{k} {v / 1024:.0f} KiB" for k, v in m["by_origin"].items()),
            ]
        )
    print()
    print_table(
        ["services", "B/breaker", "B/breaker (package code)", "total KiB", "allocated by"],
        mem_rows,
    )
    largest = str(memory_sizes[-1])
    print(f"largest allocation sites after restoring {largest}:")
    for site in memory[largest]["top_sites"][:6]:
        print(f"  {site['bytes'] / int(largest):8.0f} B/breaker  {site['site']}")

    stored = storage(client, port, sizes[-1])
    profiled = profile(port, sizes[-1], client, args.rounds) if args.profile else None
    client.close()
    print()
    for name in ("seed_format", "written_by_package"):
        s = stored[name]
        print(
            f"stored per service ({name}): STRLEN {s['strlen']} B, MEMORY USAGE"
            f" {s['memory_usage']} B, TTL {s['ttl']} s: {s['value']}"
        )
    per_key = stored["used_memory_per_key"]
    print(f"used_memory per key, {per_key['keys']} keys seeded: {per_key['bytes']:.0f} B")

    big = restore[str(sizes[-1])]
    full = sizes[-1] == SIZES[-1]
    data_trips = big["data_round_trips"]["median"]
    same = len({restore[str(n)]["data_round_trips"]["median"] for n in sizes}) == 1
    trips_ok = same and data_trips <= GOAL_DATA_ROUND_TRIPS
    goals = {
        "seconds": {
            "services": sizes[-1],
            "median": big["seconds"]["median"],
            "goal": f"<= {GOAL_SECONDS} s for {SIZES[-1]} services",
            "verdict": ("met" if big["seconds"]["median"] <= GOAL_SECONDS else "MISSED")
            if full
            else "not measured (smoke)",
        },
        "round_trips": {
            "total": big["round_trips"]["median"],
            "package_own": data_trips,
            "same_for_every_size": same,
            "goal": f"<= {GOAL_DATA_ROUND_TRIPS} round trips of the package's own, whatever N",
            "verdict": "met" if trips_ok else "MISSED",
        },
    }
    print(
        f"\nrestore of {sizes[-1]}: {big['seconds']['median'] * 1000:.0f} ms median"
        f" (goal <= {GOAL_SECONDS * 1000:.0f} ms for {SIZES[-1]}): {goals['seconds']['verdict']}"
    )
    print(
        f"round trips: {big['round_trips']['median']:.0f} in all, {data_trips:.0f} of the package's"
        f" own (the rest open redis-py's connection), the same for every N: {same}"
        f" (goal <= {GOAL_DATA_ROUND_TRIPS}):"
        f" {goals['round_trips']['verdict']}"
    )
    results = {"restore": restore, "memory": memory, "storage": stored, "goals": goals}
    if profiled is not None:
        results["profile"] = profiled
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=7, help="timed restores per size")
    parser.add_argument(
        "--profile", action="store_true", help="also time the parts of the largest restore"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny run for CI: does it work?")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds = 2
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    clean_environment()
    info = machine()
    print(
        f"restore: {args.rounds} rounds per size; {info['cpu_model']}, {info['nproc']} CPUs,"
        f" Python {info['python']}, redis-py {_redis_version()}, load {info['loadavg']},"
        f" commit {describe(info)}"
    )
    started = time.perf_counter()
    with redis_server() as port:
        results = run(args, port)
    elapsed = time.perf_counter() - started
    finish(info)
    print(f"\n{elapsed:.1f} s")
    if args.json:
        write_json(
            args.json,
            {
                "benchmark": "restore",
                "machine": info,
                "settings": {
                    "rounds": args.rounds,
                    "sizes": SMOKE_SIZES if args.smoke else SIZES,
                    "smoke": args.smoke,
                    "redis_py": _redis_version(),
                    "redis_server": _server_version(),
                },
                "seconds": round(elapsed, 2),
                **results,
            },
        )
    return 0


def _redis_version() -> str:
    return str(redis.__version__)


def _server_version() -> str:
    binary = shutil.which("redis-server") or "redis-server"
    done = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    return done.stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
