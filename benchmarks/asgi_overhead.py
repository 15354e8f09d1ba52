"""Per-request cost of CircuitBreakerMiddleware, measured in process by calling ASGI directly.

No server and no HTTP client: each request is `await app(scope, receive, send)` with a scope dict
and receive/send callables built here, in a tight loop, so the figures are the Python cost of the
middleware stack and nothing else. Every contender runs once per round, in a shuffled order,
and the figures are medians over the rounds; overheads and ratios are taken within a round
(contender minus the bare app of the same round) so the machine's drift cancels out.

Contenders (Starlette app, route `/{service}/ping` answering a small PlainTextResponse):
  harness           a raw ASGI callable that sends the same two messages (the loop's own cost)
  bare              the app alone
  floor             a minimal pure ASGI middleware that only wraps send to watch the status
  closed            CircuitBreakerMiddleware, path under a configured prefix, breaker closed
  open              breaker opened by one failing request: the 503 rejection path
  half_open_reject  half-open with its probe slot taken: 503 with Retry-After, app not called
  half_open_probe   half-open with a free slot: the request is let through as a probe
  pass_through      CircuitBreakerMiddleware, path under no configured prefix
  base_http         Starlette's BaseHTTPMiddleware doing nothing (reference only)
  fastapi_*         bare / floor / closed on a FastAPI app with the same route

Run:  .venv/bin/python benchmarks/asgi_overhead.py [--rounds N] [--requests N] [--json PATH]
CI:   .venv/bin/python benchmarks/asgi_overhead.py --smoke
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import sys
import time
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
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway_breaker import (
    BreakerSnapshot,
    CircuitBreaker,
    CircuitBreakerManager,
    CircuitBreakerMiddleware,
    CircuitState,
    Config,
    Permit,
)

GOAL_CLOSED_OVER_FLOOR = 2.0  # closed-breaker overhead / floor overhead: at most this
GOAL_OPEN_OVER_BARE = 1.0  # open-breaker rejection time / bare request time: below this
SERVICE = "svc"
# A realistic small gateway: ten flat prefixes; the benchmarked one is /svc.
SERVICES = (SERVICE, *(f"svc{i}" for i in range(1, 10)))
MAX_PROBE_BATCH = 10_000  # success_threshold's upper bound keeps the probe breaker half-open


# -- the harness: scope, receive, send -------------------------------------------------------


def make_scope(path: str) -> dict[str, Any]:
    """An HTTP scope as uvicorn builds it (copied before every request)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50_000),
        "scheme": "http",
        "method": "GET",
        "root_path": "",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [
            (b"host", b"gateway.local:8000"),
            (b"user-agent", b"asgi-overhead-benchmark"),
            (b"accept", b"*/*"),
        ],
    }


class Source:
    """receive(): the (empty) request body once, then http.disconnect."""

    __slots__ = ("consumed",)

    def __init__(self) -> None:
        self.consumed = False

    async def __call__(self) -> Message:
        if self.consumed:
            return {"type": "http.disconnect"}
        self.consumed = True
        return {"type": "http.request", "body": b"", "more_body": False}


class Sink:
    """send(): keeps the status, headers and body of the last response."""

    __slots__ = ("body", "headers", "status")

    def __init__(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = message["headers"]
            self.body = b""
        else:
            self.body += message.get("body", b"")


async def timed_batch(app: ASGIApp, scope: dict[str, Any], requests: int) -> int:
    """Nanoseconds taken by `requests` sequential requests."""
    source = Source()
    sink = Sink()
    start = time.perf_counter_ns()
    for _ in range(requests):
        source.consumed = False
        await app(scope.copy(), source, sink)
    return time.perf_counter_ns() - start


async def one_request(app: ASGIApp, path: str) -> Sink:
    sink = Sink()
    await app(make_scope(path), Source(), sink)
    return sink


# -- the apps and middlewares ----------------------------------------------------------------


class FloorMiddleware:
    """The least a status-watching pure ASGI middleware can do: wrap send, note the status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.last_status = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 0

        async def send_watching(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(scope, receive, send_watching)
        self.last_status = status


class NoopBaseHTTPMiddleware(BaseHTTPMiddleware):
    """BaseHTTPMiddleware doing nothing: the reference the package must not be built on."""

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        return await call_next(request)


async def harness_app(scope: Scope, receive: Receive, send: Send) -> None:
    """No framework at all: the same two messages a PlainTextResponse sends."""
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", b"4"), (b"content-type", b"text/plain; charset=utf-8")],
        }
    )
    await send({"type": "http.response.body", "body": b"pong"})


async def ping(request: Request) -> Response:
    return PlainTextResponse("pong")


async def fail(request: Request) -> Response:
    return PlainTextResponse("boom", status_code=500)


def starlette_app(middleware: list[Middleware]) -> Starlette:
    return Starlette(
        routes=[Route("/{service}/ping", ping), Route("/{service}/fail", fail)],
        middleware=middleware,
    )


def fastapi_app(middleware: list[Middleware]) -> FastAPI:
    app = FastAPI(middleware=middleware)

    @app.get("/{service}/ping", response_class=PlainTextResponse)
    async def fastapi_ping(service: str) -> Response:
        return PlainTextResponse("pong")

    return app


def breaker_config(**policy: Any) -> Config:
    """In-memory config (no Redis) with SERVICES under their default prefixes."""
    return Config(
        redis={"url": None},
        circuit_breaker={
            "enabled": True,
            "services": {name: {"prefix": f"/{name}", **policy} for name in SERVICES},
        },
    )


def breaker_middleware(**policy: Any) -> tuple[Middleware, CircuitBreaker]:
    """The middleware (with a manager of its own, never Redis) and the /svc breaker."""
    config = breaker_config(**policy)
    manager = CircuitBreakerManager(config)
    if manager.shared:
        raise RuntimeError("the benchmark manager must be in memory only")
    middleware = Middleware(CircuitBreakerMiddleware, config=config, manager=manager)
    return middleware, manager.get(SERVICE)


# -- contenders ------------------------------------------------------------------------------


@dataclass
class Contender:
    name: str
    app: ASGIApp
    path: str
    status: int  # the status every request must get
    baseline: str | None  # overhead = this contender's time minus the baseline's
    description: str
    prepare: Callable[[], None] | None = None  # untimed, before every batch
    check: Callable[[], None] | None = None  # untimed, after every batch
    samples_ns: list[float] = field(default_factory=list)  # per-request time, one per round


def expect_state(breaker: CircuitBreaker, state: CircuitState) -> Callable[[], None]:
    def check() -> None:
        if breaker.state is not state:
            raise AssertionError(f"breaker is {breaker.state.value}, expected {state.value}")

    return check


def set_half_open(breaker: CircuitBreaker) -> None:
    """Half-open with no probe out and no success counted, as after another instance's probe."""
    breaker.restore(BreakerSnapshot(state=CircuitState.HALF_OPEN))


def build_contenders() -> list[Contender]:
    path = f"/{SERVICE}/ping"
    contenders = [
        Contender("harness", harness_app, path, 200, None, "raw ASGI callable, no framework"),
        Contender("bare", starlette_app([]), path, 200, None, "Starlette app, no middleware"),
        Contender(
            "floor",
            starlette_app([Middleware(FloorMiddleware)]),
            path,
            200,
            "bare",
            "pure ASGI middleware wrapping send",
        ),
    ]

    mw, closed = breaker_middleware()
    contenders.append(
        Contender(
            "closed",
            starlette_app([mw]),
            path,
            200,
            "bare",
            "breaker closed, path under a prefix",
            check=expect_state(closed, CircuitState.CLOSED),
        )
    )

    # Opened for real: one failing request with failure_threshold 1; a day before it probes.
    mw, opened = breaker_middleware(failure_threshold=1, timeout_seconds=86_400)
    contenders.append(
        Contender(
            "open",
            starlette_app([mw]),
            path,
            503,
            "bare",
            "breaker open: 503 rejection",
            check=expect_state(opened, CircuitState.OPEN),
        )
    )

    mw, reject = breaker_middleware(timeout_seconds=86_400)
    held: list[Permit] = []

    def take_probe_slot() -> None:
        # Half-open as the fleet would set it, then one probe out that never reports back.
        for old in held:
            reject.release(old)
        reject.restore(BreakerSnapshot(state=CircuitState.HALF_OPEN))
        permit = reject.acquire()
        if permit is None or not permit.probe:
            raise AssertionError("could not take the half-open probe slot")
        held[:] = [permit]

    contenders.append(
        Contender(
            "half_open_reject",
            starlette_app([mw]),
            path,
            503,
            "bare",
            "half-open, probe slot taken: 503 + Retry-After",
            prepare=take_probe_slot,
            check=expect_state(reject, CircuitState.HALF_OPEN),
        )
    )

    # success_threshold at its maximum: every request is a successful probe, none closes it.
    mw, probe = breaker_middleware(timeout_seconds=86_400, success_threshold=MAX_PROBE_BATCH)
    contenders.append(
        Contender(
            "half_open_probe",
            starlette_app([mw]),
            path,
            200,
            "bare",
            "half-open, probe let through and recorded",
            prepare=lambda: set_half_open(probe),
            check=expect_state(probe, CircuitState.HALF_OPEN),
        )
    )

    mw, _ = breaker_middleware()
    contenders += [
        Contender(
            "pass_through",
            starlette_app([mw]),
            "/other/ping",
            200,
            "bare",
            "CircuitBreakerMiddleware, path under no prefix",
        ),
        Contender(
            "base_http",
            starlette_app([Middleware(NoopBaseHTTPMiddleware)]),
            path,
            200,
            "bare",
            "BaseHTTPMiddleware doing nothing (reference)",
        ),
        Contender("fastapi_bare", fastapi_app([]), path, 200, None, "FastAPI app, no middleware"),
        Contender(
            "fastapi_floor",
            fastapi_app([Middleware(FloorMiddleware)]),
            path,
            200,
            "fastapi_bare",
            "FastAPI + floor middleware",
        ),
    ]
    mw, fastapi_closed = breaker_middleware()
    contenders.append(
        Contender(
            "fastapi_closed",
            fastapi_app([mw]),
            path,
            200,
            "fastapi_bare",
            "FastAPI + breaker closed",
            check=expect_state(fastapi_closed, CircuitState.CLOSED),
        )
    )
    # The middleware straight over a raw ASGI app, no framework: what a rejection costs next to
    # a whole closed request (issue 23: a rejection at most half of one).
    for name, state, status, description in (
        ("raw_closed", CircuitState.CLOSED, 200, "raw ASGI app, breaker closed"),
        ("raw_open", CircuitState.OPEN, 503, "raw ASGI app, breaker open: 503 rejection"),
    ):
        config = breaker_config(failure_threshold=1, timeout_seconds=86_400)
        manager = CircuitBreakerManager(config)
        breaker = manager.get(SERVICE)
        if state is CircuitState.OPEN:
            breaker.restore(BreakerSnapshot(state=CircuitState.OPEN, opened_at=time.time()))
        raw = CircuitBreakerMiddleware(harness_app, config=config, manager=manager)
        contenders.append(
            Contender(
                name, raw, path, status, "harness", description, check=expect_state(breaker, state)
            )
        )
    return contenders


async def open_breaker(contender: Contender) -> None:
    """Drive the `open` contender's breaker open with one failing request through the app."""
    sink = await one_request(contender.app, f"/{SERVICE}/fail")
    if sink.status != 500:
        raise AssertionError(f"the failing route answered {sink.status}")
    if contender.check is not None:
        contender.check()


async def verify(contender: Contender) -> None:
    """One request, checked: the right status, and a 503 that carries the contract's headers."""
    if contender.prepare is not None:
        contender.prepare()
    sink = await one_request(contender.app, contender.path)
    if sink.status != contender.status:
        raise AssertionError(f"{contender.name}: status {sink.status}, expected {contender.status}")
    headers = dict(sink.headers)
    if contender.status == 503:
        retry_after = int(headers.get(b"retry-after", b"0"))
        if retry_after < 1 or headers.get(b"cache-control") != b"no-store":
            raise AssertionError(f"{contender.name}: 503 without Retry-After/Cache-Control")
    elif sink.body != b"pong":
        raise AssertionError(f"{contender.name}: body {sink.body!r}")
    if contender.check is not None:
        contender.check()


async def run_batch(contender: Contender, scope: dict[str, Any], requests: int) -> float:
    if contender.prepare is not None:
        contender.prepare()
    elapsed = await timed_batch(contender.app, scope, requests)
    if contender.check is not None:
        contender.check()
    return elapsed / requests


async def measure(contenders: list[Contender], rounds: int, requests: int, warmup: int) -> None:
    """Verify and warm up every contender, then `rounds` rounds, each in a shuffled order."""
    scopes = {c.name: make_scope(c.path) for c in contenders}
    for contender in contenders:
        await verify(contender)
        await run_batch(contender, scopes[contender.name], warmup)
    order = list(contenders)
    shuffle = random.Random(20261129)
    for _ in range(rounds):
        shuffle.shuffle(order)
        gc.collect()
        gc.disable()
        try:
            for contender in order:
                ns = await run_batch(contender, scopes[contender.name], requests)
                contender.samples_ns.append(ns)
        finally:
            gc.enable()


async def run_all(contenders: list[Contender], rounds: int, requests: int, warmup: int) -> None:
    await open_breaker(next(c for c in contenders if c.name == "open"))
    await measure(contenders, rounds, requests, warmup)


# -- results ---------------------------------------------------------------------------------


def overheads(contender: Contender, by_name: dict[str, Contender]) -> list[float]:
    """Per-round overhead in ns: this contender's time minus its baseline's in the same round."""
    assert contender.baseline is not None
    base = by_name[contender.baseline].samples_ns
    return [c - b for c, b in zip(contender.samples_ns, base, strict=True)]


def ratio(
    by_name: dict[str, Contender],
    numerator: str,
    denominator: str,
    *,
    overhead: bool,
) -> dict[str, float]:
    """Ratio of medians (the headline), its bootstrap 95% interval, and the per-round spread."""

    def series(name: str) -> list[float]:
        contender = by_name[name]
        return overheads(contender, by_name) if overhead else contender.samples_ns

    top, bottom = series(numerator), series(denominator)
    bottom_median = summary(bottom)["median"]
    headline = summary(top)["median"] / bottom_median if bottom_median > 0 else float("nan")
    low, high = bootstrap_ratio_ci(top, bottom)
    per_round = [t / b for t, b in zip(top, bottom, strict=True) if b > 0]
    spread = summary(per_round) if per_round else {}
    return {
        "ratio": headline,
        "ci95_low": low,
        "ci95_high": high,
        "per_round_median": spread.get("median", float("nan")),
        "per_round_p25": spread.get("p25", float("nan")),
        "per_round_p75": spread.get("p75", float("nan")),
    }


def report(contenders: list[Contender]) -> dict[str, Any]:
    by_name = {c.name: c for c in contenders}
    rows: list[list[str]] = []
    results: dict[str, Any] = {}
    for c in contenders:
        us = summary([ns / 1000 for ns in c.samples_ns])
        entry: dict[str, Any] = {"description": c.description, "path": c.path, "us": us}
        over = ""
        if c.baseline is not None:
            over_us = summary([ns / 1000 for ns in overheads(c, by_name)])
            entry["overhead_us"] = over_us
            entry["baseline"] = c.baseline
            over = f"{over_us['median']:+.2f} [{over_us['p25']:+.2f}, {over_us['p75']:+.2f}]"
        results[c.name] = entry
        rows.append(
            [
                c.name,
                f"{us['median']:.2f}",
                f"{us['p25']:.2f} - {us['p75']:.2f}",
                over,
                c.description,
            ]
        )
    print_table(
        ["contender", "us/request", "p25 - p75", "overhead us [p25, p75]", "what"],
        rows,
    )

    ratios = {
        "closed_overhead / floor_overhead": (
            ratio(by_name, "closed", "floor", overhead=True),
            f"<= {GOAL_CLOSED_OVER_FLOOR}",
            GOAL_CLOSED_OVER_FLOOR,
            True,
        ),
        "fastapi_closed_overhead / fastapi_floor_overhead": (
            ratio(by_name, "fastapi_closed", "fastapi_floor", overhead=True),
            f"<= {GOAL_CLOSED_OVER_FLOOR}",
            GOAL_CLOSED_OVER_FLOOR,
            True,
        ),
        "open_rejection_time / bare_request_time": (
            ratio(by_name, "open", "bare", overhead=False),
            f"< {GOAL_OPEN_OVER_BARE}",
            GOAL_OPEN_OVER_BARE,
            False,
        ),
        "half_open_reject_time / bare_request_time": (
            ratio(by_name, "half_open_reject", "bare", overhead=False),
            "(info)",
            None,
            False,
        ),
        "half_open_probe_overhead / floor_overhead": (
            ratio(by_name, "half_open_probe", "floor", overhead=True),
            "(info)",
            None,
            True,
        ),
        "pass_through_overhead / floor_overhead": (
            ratio(by_name, "pass_through", "floor", overhead=True),
            "(info)",
            None,
            True,
        ),
        "base_http_overhead / floor_overhead": (
            ratio(by_name, "base_http", "floor", overhead=True),
            "(info)",
            None,
            True,
        ),
    }
    print()
    ratio_rows: list[list[str]] = []
    ratio_results: dict[str, Any] = {}
    for name, (values, goal_text, goal, inclusive) in ratios.items():
        verdict_text = (
            ""
            if goal is None
            else verdict(
                values["ratio"],
                values["ci95_low"],
                values["ci95_high"],
                goal,
                inclusive=inclusive,
            )
        )
        ratio_results[name] = {**values, "goal": goal_text, "verdict": verdict_text or "info"}
        ratio_rows.append(
            [
                name,
                f"{values['ratio']:.2f}",
                f"{values['ci95_low']:.2f} - {values['ci95_high']:.2f}",
                goal_text,
                verdict_text,
            ]
        )
    print_table(["ratio", "value", "95% CI (bootstrap)", "goal", "verdict"], ratio_rows)
    return {"contenders": results, "ratios": ratio_results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--rounds", type=int, default=201, help="rounds (each runs every contender)"
    )
    parser.add_argument("--requests", type=int, default=400, help="requests per batch")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up requests per contender")
    parser.add_argument("--smoke", action="store_true", help="tiny run for CI: does it work?")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.requests = 3, 20
    if args.rounds < 1 or not 1 <= args.requests <= MAX_PROBE_BATCH:
        parser.error(f"--rounds >= 1 and 1 <= --requests <= {MAX_PROBE_BATCH}")
    warmup = args.warmup if args.warmup is not None else max(10, args.requests // 2)

    clean_environment()
    info = machine()
    print(
        f"asgi_overhead: {args.rounds} rounds x {args.requests} requests per contender"
        f" (warm-up {warmup}); {info['cpu_model']}, {info['nproc']} CPUs,"
        f" Python {info['python']}, load {info['loadavg']}, commit {describe(info)}"
    )
    contenders = build_contenders()
    started = time.perf_counter()
    asyncio.run(run_all(contenders, args.rounds, args.requests, warmup))
    elapsed = time.perf_counter() - started
    finish(info)
    if args.smoke:
        print("smoke run: the script works; these figures are too small to mean anything\n")
    results = report(contenders)
    print(f"\n{elapsed:.1f} s")
    if args.json:
        write_json(
            args.json,
            {
                "benchmark": "asgi_overhead",
                "machine": info,
                "settings": {
                    "rounds": args.rounds,
                    "requests": args.requests,
                    "warmup": warmup,
                    "smoke": args.smoke,
                    "services": len(SERVICES),
                },
                "seconds": round(elapsed, 2),
                **results,
                "raw_ns_per_request": {c.name: c.samples_ns for c in contenders},
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
