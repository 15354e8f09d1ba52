"""How route lookup time and breaker memory grow with the number of services.

1. Route lookup: `RouteTable.match` for tables of 10, 100, 1000 and 10000 prefixes (`/svc{i}`,
   every tenth one nested as `/group{j}/svc{i}`), on the same mix of paths for every size: hits
   under flat and nested prefixes, exact prefixes, near misses (`/svc12x/...`, which must not
   match `/svc12`) and misses. Sizes are interleaved in shuffled order within each round; the
   figure is the median over rounds of ns per lookup. Goal: flat, i.e. the 10000/10 ratio stays
   near 1 (a linear scan would make it ~1000).
2. Memory per breaker: N breakers created through `CircuitBreakerManager.get(f"svc{i}")`
   (services not in the config, so they share the default policy), measured with tracemalloc:
   everything the manager holds because of them, names included. Goal: <= 2 KB per breaker.
   For information, the same for N services declared in the config (their policy models too).

Run:  .venv/bin/python benchmarks/scale.py [--rounds N] [--json PATH]
CI:   .venv/bin/python benchmarks/scale.py --smoke
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from _common import (
    bootstrap_ratio_ci,
    clean_environment,
    describe,
    finish,
    machine,
    print_table,
    summary,
    verdict,
    write_json,
)

from gateway_breaker import CircuitBreakerManager, Config, RouteTable

SIZES = (10, 100, 1_000, 10_000)
MEMORY_SIZES: tuple[int, ...] = (100, 1_000, 10_000)
PATHS_PER_TABLE = 2_000
GOAL_FLAT = 1.5  # lookup time with 10000 prefixes / with 10: at most this
GOAL_BYTES_PER_BREAKER = 2_048
NESTED_EVERY = 10  # every tenth service lives under /group{j}
GROUPS = 7


# -- route lookup ----------------------------------------------------------------------------


def prefix_of(i: int) -> str:
    if i % NESTED_EVERY == NESTED_EVERY - 1:
        return f"/group{i % GROUPS}/svc{i}"
    return f"/svc{i}"


def routes(n: int) -> dict[str, str]:
    return {prefix_of(i): f"svc{i}" for i in range(n)}


def lookup_paths(n: int, count: int, rng: random.Random) -> list[tuple[str, str | None]]:
    """`count` request paths with the service each must resolve to (None: pass through)."""
    flat = [i for i in range(n) if i % NESTED_EVERY != NESTED_EVERY - 1]
    nested = [i for i in range(n) if i % NESTED_EVERY == NESTED_EVERY - 1]
    cases: list[tuple[str, str | None]] = []
    for k in range(count):
        kind = k % 10
        if kind < 4:  # 40%: a request under a flat prefix
            i = rng.choice(flat)
            cases.append((f"/svc{i}/items/{rng.randrange(10**6)}", f"svc{i}"))
        elif kind < 5:  # 10%: under a nested prefix
            i = rng.choice(nested)
            cases.append((f"{prefix_of(i)}/v1/orders/{rng.randrange(10**6)}", f"svc{i}"))
        elif kind < 6:  # 10%: exactly a prefix
            i = rng.randrange(n)
            cases.append((prefix_of(i), f"svc{i}"))
        elif kind < 8:  # 20%: near miss on the segment boundary
            i = rng.choice(flat)
            cases.append((f"/svc{i}x/items", None))
        else:  # 20%: no prefix at all (a group alone is no prefix either)
            if kind == 8:
                cases.append((f"/healthz/{rng.randrange(10**6)}", None))
            else:
                cases.append((f"/group{rng.randrange(GROUPS)}/other/x", None))
    rng.shuffle(cases)
    return cases


def _noop(path: str) -> str | None:
    return None


@dataclass
class Lookup:
    name: str
    match: Callable[[str], str | None]
    paths: list[str]
    samples_ns: list[float] = field(default_factory=list)


def timed_lookups(match: Callable[[str], str | None], paths: list[str], repeat: int) -> float:
    """ns per call of `match` over `paths`, `repeat` passes."""
    start = time.perf_counter_ns()
    for _ in range(repeat):
        for path in paths:
            match(path)
    return (time.perf_counter_ns() - start) / (repeat * len(paths))


def bench_lookup(sizes: tuple[int, ...], rounds: int, repeat: int) -> dict[str, Any]:
    rng = random.Random(20261129)
    contenders: list[Lookup] = []
    for n in sizes:
        table = RouteTable(routes(n))
        if len(table) != n:
            raise AssertionError(f"table of {n} holds {len(table)} prefixes")
        cases = lookup_paths(n, PATHS_PER_TABLE, rng)
        for path, expected in cases:  # the benchmark checks what it times
            got = table.match(path)
            if got != expected:
                raise AssertionError(f"{n} prefixes: {path} -> {got!r}, expected {expected!r}")
        contenders.append(Lookup(str(n), table.match, [p for p, _ in cases]))
    # The loop and call alone, on the largest size's paths: what a lookup cannot go below.
    contenders.append(Lookup("loop", _noop, contenders[-1].paths))

    for c in contenders:  # warm-up
        timed_lookups(c.match, c.paths, 1)
    order = list(contenders)
    for _ in range(rounds):
        rng.shuffle(order)
        gc.collect()
        gc.disable()
        try:
            for c in order:
                c.samples_ns.append(timed_lookups(c.match, c.paths, repeat))
        finally:
            gc.enable()

    loop = contenders[-1]
    results: dict[str, Any] = {"loop_ns": summary(loop.samples_ns), "sizes": {}}
    rows = []
    for c in contenders[:-1]:
        total = summary(c.samples_ns)
        net = summary([t - b for t, b in zip(c.samples_ns, loop.samples_ns, strict=True)])
        results["sizes"][c.name] = {"ns_per_lookup": total, "net_ns": net}
        rows.append(
            [
                c.name,
                f"{total['median']:.0f}",
                f"{total['p25']:.0f} - {total['p75']:.0f}",
                f"{net['median']:.0f}",
            ]
        )
    rows.append(["(loop + call only)", f"{summary(loop.samples_ns)['median']:.0f}", "", ""])
    print_table(["prefixes", "ns/lookup", "p25 - p75", "net of loop, ns"], rows)

    first, last = contenders[0], contenders[-2]
    per_round = [a / b for a, b in zip(last.samples_ns, first.samples_ns, strict=True)]
    flat = summary(last.samples_ns)["median"] / summary(first.samples_ns)["median"]
    low, high = bootstrap_ratio_ci(last.samples_ns, first.samples_ns)
    outcome = verdict(flat, low, high, GOAL_FLAT, inclusive=True)
    print(
        f"\nlookup {last.name}/{first.name} = {flat:.2f} (95% CI {low:.2f} - {high:.2f};"
        f" goal <= {GOAL_FLAT}, linear would be {int(last.name) / int(first.name):.0f}): {outcome}"
    )
    results["ratio"] = {
        "name": f"lookup_{last.name} / lookup_{first.name}",
        "ratio": flat,
        "ci95_low": low,
        "ci95_high": high,
        "per_round": summary(per_round),
        "goal": f"<= {GOAL_FLAT}",
        "verdict": outcome,
    }
    return results


# -- memory ----------------------------------------------------------------------------------


def traced_bytes(build: Callable[[], object]) -> tuple[int, object, tracemalloc.Snapshot]:
    """Bytes still allocated after `build()` (its result kept alive), and a snapshot."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = build()
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
        snapshot = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    return after - before, kept, snapshot


def unconfigured_breakers(n: int) -> Callable[[], object]:
    config = Config(redis={"url": None})
    manager = CircuitBreakerManager(config)
    manager.get("warm")  # first-use costs (policy lookup caches) are not per breaker

    def build() -> object:
        for i in range(n):
            manager.get(f"svc{i}")
        return manager

    return build


def configured_services(n: int) -> Callable[[], object]:
    services = {f"svc{i}": {"prefix": prefix_of(i)} for i in range(n)}

    def build() -> object:
        config = Config(redis={"url": None}, circuit_breaker={"services": services})
        manager = CircuitBreakerManager(config)
        for name in config.circuit_breaker.services:
            manager.get(name)
        return manager, RouteTable(config.circuit_breaker.routes())

    return build


def top_allocations(snapshot: tracemalloc.Snapshot, n: int, limit: int = 6) -> list[str]:
    stats = snapshot.filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, __file__)]
    ).statistics("lineno")
    return [
        f"{s.size / n:7.0f} B/breaker  {s.traceback[0].filename.split('site-packages/')[-1]}"
        f":{s.traceback[0].lineno}"
        for s in stats[:limit]
    ]


def bench_memory(sizes: tuple[int, ...], show_top: bool) -> dict[str, Any]:
    results: dict[str, Any] = {"unconfigured": {}, "configured": {}}
    rows = []
    worst = 0.0
    for n in sizes:
        used, kept, snapshot = traced_bytes(unconfigured_breakers(n))
        manager = kept
        assert isinstance(manager, CircuitBreakerManager)
        if len(manager.breakers()) != n + 1:
            raise AssertionError(f"expected {n + 1} breakers, got {len(manager.breakers())}")
        per = used / n
        worst = max(worst, per)
        results["unconfigured"][str(n)] = {"bytes": used, "bytes_per_breaker": per}
        if show_top and n == sizes[-1]:
            results["top_allocations"] = top_allocations(snapshot, n)
        del kept, manager, snapshot
        used_cfg, kept, _ = traced_bytes(configured_services(n))
        per_cfg = used_cfg / n
        results["configured"][str(n)] = {"bytes": used_cfg, "bytes_per_service": per_cfg}
        del kept
        rows.append([str(n), f"{per:.0f}", f"{used / 1024:.0f}", f"{per_cfg:.0f}"])
    print_table(
        ["breakers", "B/breaker", "total KiB", "B/service, declared in config (info)"],
        rows,
    )
    outcome = "met" if worst <= GOAL_BYTES_PER_BREAKER else "MISSED"
    goal = GOAL_BYTES_PER_BREAKER
    print(f"\nmemory: worst {worst:.0f} B per breaker (goal <= {goal}): {outcome}")
    if "top_allocations" in results:
        print(f"largest allocation sites at {sizes[-1]} breakers:")
        for line in results["top_allocations"]:
            print("  " + line)
    results["goal"] = f"<= {GOAL_BYTES_PER_BREAKER} B"
    results["worst_bytes_per_breaker"] = worst
    results["verdict"] = outcome
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=31, help="rounds for the lookup timing")
    parser.add_argument("--repeat", type=int, default=10, help="passes over the paths per batch")
    parser.add_argument("--smoke", action="store_true", help="tiny run for CI: does it work?")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    memory_sizes = MEMORY_SIZES
    if args.smoke:
        args.rounds, args.repeat = 2, 1
        memory_sizes = (100, 1_000)
    if args.rounds < 1 or args.repeat < 1:
        parser.error("--rounds and --repeat must be at least 1")

    clean_environment()
    info = machine()
    print(
        f"scale: {args.rounds} rounds x {args.repeat} x {PATHS_PER_TABLE} lookups per size;"
        f" {info['cpu_model']}, {info['nproc']} CPUs, Python {info['python']},"
        f" load {info['loadavg']}, commit {describe(info)}"
    )
    started = time.perf_counter()
    lookup = bench_lookup(SIZES, args.rounds, args.repeat)
    print()
    memory = bench_memory(memory_sizes, show_top=True)
    elapsed = time.perf_counter() - started
    finish(info)
    print(f"\n{elapsed:.1f} s")
    if args.json:
        write_json(
            args.json,
            {
                "benchmark": "scale",
                "machine": info,
                "settings": {
                    "rounds": args.rounds,
                    "repeat": args.repeat,
                    "paths_per_table": PATHS_PER_TABLE,
                    "sizes": SIZES,
                    "memory_sizes": memory_sizes,
                    "smoke": args.smoke,
                },
                "seconds": round(elapsed, 2),
                "lookup": lookup,
                "memory": memory,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
