"""Where the time of CircuitBreakerMiddleware goes: isolated paths, components, cProfile.

Companion of asgi_overhead.py, for when a goal is missed:
  A. The middleware around a raw ASGI app (no framework), interleaved rounds, medians: the
     closed, open and pass-through paths against the floor middleware, without Starlette's
     own cost and cache footprint around them.
  B. The pieces of the request path timed alone (timeit; rounds of every piece in shuffled
     order, medians over the rounds), in ns per call, next to cheaper ways of doing the same
     work, to size what a change would buy.
  C. cProfile of the closed and the open path inside the Starlette app: the functions with
     the most own time per request. cProfile inflates every Python call, so read its figures
     as a ranking and as call counts, and sections A and B as the costs.

Run:  .venv/bin/python benchmarks/profile_breaker.py [--rounds N] [--json PATH]
CI:   .venv/bin/python benchmarks/profile_breaker.py --smoke
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import random
import statistics
import sys
import sysconfig
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import (
    bootstrap_ratio_ci,
    clean_environment,
    describe,
    finish,
    machine,
    print_table,
    summary,
    write_json,
)
from asgi_overhead import (
    SERVICE,
    Contender,
    FloorMiddleware,
    breaker_config,
    expect_state,
    harness_app,
    make_scope,
    measure,
    starlette_app,
    timed_batch,
)
from starlette.middleware import Middleware
from starlette.types import ASGIApp

from gateway_breaker import (
    CircuitBreaker,
    CircuitBreakerManager,
    CircuitBreakerMiddleware,
    CircuitState,
    Permit,
    RouteTable,
)

PATH = f"/{SERVICE}/ping"


def middleware_on(app: ASGIApp, **policy: Any) -> tuple[CircuitBreakerMiddleware, CircuitBreaker]:
    config = breaker_config(**policy)
    manager = CircuitBreakerManager(config)
    if manager.shared:
        raise RuntimeError("the benchmark manager must be in memory only")
    return CircuitBreakerMiddleware(app, config=config, manager=manager), manager.get(SERVICE)


def force_open(breaker: CircuitBreaker) -> None:
    """One failure through the public two-phase API (the policy has failure_threshold 1)."""
    permit = breaker.acquire()
    if permit is None:
        raise AssertionError("a closed breaker refused a call")
    breaker.record(permit, failed=True)
    if breaker.state is not CircuitState.OPEN:
        raise AssertionError(f"breaker is {breaker.state.value} after a failure")


# -- A. isolated paths -----------------------------------------------------------------------


def isolated_contenders() -> list[Contender]:
    closed_mw, closed = middleware_on(harness_app)
    open_mw, opened = middleware_on(harness_app, failure_threshold=1, timeout_seconds=86_400)
    force_open(opened)
    through_mw, _ = middleware_on(harness_app)
    return [
        Contender("harness", harness_app, PATH, 200, None, "raw ASGI app alone"),
        Contender("floor", FloorMiddleware(harness_app), PATH, 200, "harness", "floor middleware"),
        Contender(
            "closed",
            closed_mw,
            PATH,
            200,
            "harness",
            "breaker closed",
            check=expect_state(closed, CircuitState.CLOSED),
        ),
        Contender(
            "open",
            open_mw,
            PATH,
            503,
            "harness",
            "breaker open (503, app not called)",
            check=expect_state(opened, CircuitState.OPEN),
        ),
        Contender(
            "pass_through", through_mw, "/other/ping", 200, "harness", "path under no prefix"
        ),
    ]


def report_isolated(contenders: list[Contender]) -> dict[str, Any]:
    harness = contenders[0].samples_ns
    results: dict[str, Any] = {}
    rows = []
    for c in contenders:
        us = summary([ns / 1000 for ns in c.samples_ns])
        entry: dict[str, Any] = {"us": us}
        over = ""
        if c.baseline is not None:
            diff = summary([(a - b) / 1000 for a, b in zip(c.samples_ns, harness, strict=True)])
            entry["overhead_us"] = diff
            over = f"{diff['median']:+.2f}"
        results[c.name] = entry
        rows.append([c.name, f"{us['median']:.2f}", over, c.description])
    print_table(["isolated", "us/request", "over harness, us", "what"], rows)
    by_name = {c.name: c for c in contenders}

    def overhead_of(name: str) -> list[float]:
        return [a - b for a, b in zip(by_name[name].samples_ns, harness, strict=True)]

    for top, bottom in (("closed", "floor"), ("pass_through", "floor"), ("open", "floor")):
        value = summary(overhead_of(top))["median"] / summary(overhead_of(bottom))["median"]
        low, high = bootstrap_ratio_ci(overhead_of(top), overhead_of(bottom))
        results[f"{top}_over_{bottom}"] = {"ratio": value, "ci95_low": low, "ci95_high": high}
        print(f"isolated {top}/{bottom} overhead: {value:.2f} (95% CI {low:.2f} - {high:.2f})")
    return results


# -- B. components ---------------------------------------------------------------------------


def ns_per_call(
    functions: dict[str, Callable[[], object]], number: int, repeat: int
) -> dict[str, float]:
    """Median over `repeat` rounds of ns per call of each function, an empty call subtracted.

    Every round times every function once, in a shuffled order, as the ASGI benchmarks do.
    """
    empty = timeit.Timer(lambda: None)
    timers = {label: timeit.Timer(fn) for label, fn in functions.items()}
    samples: dict[str, list[float]] = {label: [] for label in functions}
    order = list(timers)
    rng = random.Random(20261129)
    for _ in range(repeat):
        rng.shuffle(order)
        for label in order:
            took = timers[label].timeit(number) - empty.timeit(number)
            samples[label].append(took / number * 1e9)
    return {label: statistics.median(values) for label, values in samples.items()}


def problem_body(breaker: CircuitBreaker, retry_after: int) -> dict[str, object]:
    """The 503 body the middleware sends (the contract's fields)."""
    state = breaker.state.value
    return {
        "type": "about:blank",
        "title": "Service Unavailable",
        "status": 503,
        "detail": f"Circuit breaker for service '{breaker.name}' is {state}",
        "service": breaker.name,
        "state": state,
        "retry_after": retry_after,
    }


def flat_match(prefixes: dict[str, str]) -> Callable[[str], str | None]:
    """Prefix lookup for a table whose prefixes are all one segment deep: one slice, one probe."""
    get = prefixes.get

    def match(path: str) -> str | None:
        end = path.find("/", 1)
        return get(path if end < 0 else path[:end])

    return match


def components(number: int, repeat: int) -> dict[str, dict[str, float]]:
    config = breaker_config(failure_threshold=1, timeout_seconds=86_400)
    routes = config.circuit_breaker.routes()
    table = RouteTable(routes)
    manager = CircuitBreakerManager(config)
    closed = manager.get(SERVICE)
    opened = manager.get("svc1")
    force_open(opened)
    policy = closed.policy
    codes = policy.failure_status_codes
    encoder = json.JSONEncoder(separators=(",", ":"))
    body = problem_body(opened, 86_400)
    head, _, _ = json.dumps(body, separators=(",", ":")).rpartition('"retry_after":')
    template = (head + '"retry_after":').encode()
    fast = flat_match(dict(routes))
    if fast(PATH) != table.match(PATH) or fast("/other/x") is not None:
        raise AssertionError("flat_match disagrees with RouteTable")

    def closed_cycle() -> None:
        permit = closed.acquire()
        assert permit is not None
        closed.record(permit, False)
        closed.release(permit)

    def acquire_release() -> None:
        permit = closed.acquire()
        assert permit is not None
        closed.release(permit)

    groups: dict[str, dict[str, Callable[[], object]]] = {
        "route lookup": {
            "RouteTable.match('/svc/ping'), 10 flat prefixes": lambda: table.match(PATH),
            "  alternative: flat fast path (find + slice + dict.get)": lambda: fast(PATH),
            "manager.get(service)": lambda: manager.get(SERVICE),
        },
        "closed breaker": {
            "acquire() + release()": acquire_release,
            "acquire() + record(ok) + release()": closed_cycle,
            "time.time() (called by acquire and by record)": time.time,
            "Permit(...) allocation": lambda: Permit(0, False, 0.0),
            "policy.is_failure_status(200)": lambda: policy.is_failure_status(200),
            "  alternative: 200 in codes (frozenset kept on the breaker)": lambda: 200 in codes,
        },
        "open breaker (503 body)": {
            "acquire() -> None": opened.acquire,
            "retry_after_header()": opened.retry_after_header,
            "state.value (StrEnum)": lambda: opened.state.value,
            "json.dumps(body, separators=...).encode()": lambda: json.dumps(
                body, separators=(",", ":")
            ).encode(),
            "  alternative: shared JSONEncoder.encode(body).encode()": lambda: encoder.encode(
                body
            ).encode(),
            "  alternative: bytes template + str(retry_after)": lambda: (
                template + str(86_400).encode() + b"}"
            ),
        },
    }
    flat = {(group, label): fn for group, items in groups.items() for label, fn in items.items()}
    timed = ns_per_call({f"{g}|{label}": fn for (g, label), fn in flat.items()}, number, repeat)
    results: dict[str, dict[str, float]] = {}
    for group, items in groups.items():
        rows = []
        results[group] = {}
        for label in items:
            ns = timed[f"{group}|{label}"]
            results[group][label.strip()] = ns
            rows.append([label, f"{ns:.0f}"])
        print_table([group, "ns/call"], rows)
        print()
    return results


# -- C. cProfile -----------------------------------------------------------------------------


def short_path(filename: str) -> str:
    """site-packages/x/y.py -> x/y.py, the stdlib's json/encoder.py -> stdlib/json/encoder.py."""
    if "site-packages/" in filename:
        return filename.split("site-packages/")[-1]
    stdlib = sysconfig.get_paths()["stdlib"]
    if filename.startswith(stdlib):
        return "stdlib" + filename[len(stdlib) :]
    root = str(Path(__file__).resolve().parents[1]) + "/"
    return filename.removeprefix(root)


def profile_app(app: ASGIApp, path: str, requests: int, top: int, title: str) -> dict[str, Any]:
    scope = make_scope(path)
    asyncio.run(timed_batch(app, scope, min(requests, 500)))  # warm-up
    profiler = cProfile.Profile()

    async def run() -> None:
        profiler.enable()
        try:
            await timed_batch(app, scope, requests)
        finally:
            profiler.disable()

    asyncio.run(run())
    stats = pstats.Stats(profiler)
    entries: list[dict[str, Any]] = []
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    for (filename, line, func), (_cc, calls, own, cumulative, _callers) in raw.items():
        if func in {"timed_batch", "run"} or "disable" in func:
            continue
        where = short_path(filename)
        entries.append(
            {
                "function": f"{where}:{line}({func})",
                "calls_per_request": calls / requests,
                "own_ns_per_request": own / requests * 1e9,
                "cumulative_ns_per_request": cumulative / requests * 1e9,
            }
        )
    entries.sort(key=lambda e: e["own_ns_per_request"], reverse=True)
    total = sum(e["own_ns_per_request"] for e in entries)
    package = sum(e["own_ns_per_request"] for e in entries if "gateway_breaker" in e["function"])
    ours = [e for e in entries if "gateway_breaker" in e["function"]]
    headers = ["function", "calls/req", "own ns/req", "cum ns/req"]
    print(f"cProfile, {title} ({requests} requests; ns are profiled, i.e. inflated):")
    print_table(headers, profile_rows(entries[:top]))
    print(
        f"own time in gateway_breaker: {package:.0f} of {total:.0f} ns per request"
        f" ({package / total:.0%}), by function:"
    )
    print_table(headers, profile_rows(ours))
    print()
    return {"top": entries[:top], "gateway_breaker": ours, "package_share": package / total}


def profile_rows(entries: list[dict[str, Any]]) -> list[list[str]]:
    return [
        [
            e["function"][-72:],
            f"{e['calls_per_request']:.0f}",
            f"{e['own_ns_per_request']:.0f}",
            f"{e['cumulative_ns_per_request']:.0f}",
        ]
        for e in entries
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=201, help="rounds for section A")
    parser.add_argument("--requests", type=int, default=400, help="requests per batch in A")
    parser.add_argument("--profile-requests", type=int, default=20_000, help="requests in C")
    parser.add_argument("--top", type=int, default=15, help="functions listed per profile")
    parser.add_argument("--smoke", action="store_true", help="tiny run for CI: does it work?")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    number, repeat = 50_000, 15
    if args.smoke:
        args.rounds, args.requests, args.profile_requests = 2, 20, 50
        number, repeat = 200, 2
    clean_environment()
    info = machine()
    print(
        f"profile_breaker: {info['cpu_model']}, {info['nproc']} CPUs, Python {info['python']},"
        f" load {info['loadavg']}, commit {describe(info)}\n"
    )
    if args.smoke:
        print("smoke run: the script works; these figures are too small to mean anything\n")
    started = time.perf_counter()

    isolated = isolated_contenders()
    asyncio.run(measure(isolated, args.rounds, args.requests, max(10, args.requests // 2)))
    section_a = report_isolated(isolated)
    print()
    section_b = components(number, repeat)

    config = breaker_config(failure_threshold=1, timeout_seconds=86_400)
    manager = CircuitBreakerManager(config)
    mw = Middleware(CircuitBreakerMiddleware, config=config, manager=manager)
    app = starlette_app([mw])
    force_open(manager.get("svc1"))
    section_c = {
        "closed": profile_app(
            app, PATH, args.profile_requests, args.top, "closed breaker, Starlette app"
        ),
        "open": profile_app(
            app, "/svc1/ping", args.profile_requests, args.top, "open breaker, Starlette app"
        ),
    }
    elapsed = time.perf_counter() - started
    finish(info)
    print(f"{elapsed:.1f} s")
    if args.json:
        write_json(
            args.json,
            {
                "benchmark": "profile_breaker",
                "machine": info,
                "settings": {
                    "rounds": args.rounds,
                    "requests": args.requests,
                    "profile_requests": args.profile_requests,
                    "timeit_number": number,
                    "timeit_repeat": repeat,
                    "smoke": args.smoke,
                },
                "isolated": section_a,
                "components_ns": section_b,
                "cprofile": section_c,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
