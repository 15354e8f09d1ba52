"""`gateway-breaker`: look at and steer the fleet's breakers through Redis, no gateway needed.

    gateway-breaker status [--json]
    gateway-breaker watch [--json]
    gateway-breaker open SERVICE [--for SECONDS] [--reason TEXT]
    gateway-breaker disable SERVICE | metrics-only SERVICE   (same options)
    gateway-breaker release SERVICE | reset SERVICE [--reason TEXT]
    gateway-breaker history SERVICE [--limit N] [--json]
    gateway-breaker fleet [--json]

Redis comes from `--redis-url` or REDIS_URL, other settings from `--config` or
GATEWAY_BREAKER_CONFIG. Exit codes: 0 done, 1 the command failed (Redis unreachable, unknown
service, change not applied), 2 usage (bad arguments or configuration). Errors are one line on
stderr; a password in a URL is never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import re
import sys
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn

from gateway_breaker.config import Config, redact_url
from gateway_breaker.errors import ConfigError, StoreError, redact_secrets

if TYPE_CHECKING:
    from gateway_breaker.manager import CircuitBreakerManager

PROG = "gateway-breaker"
OK, FAILED, USAGE = 0, 1, 2
MANUAL_COMMANDS = {"open": "forced_open", "disable": "disabled", "metrics-only": "metrics_only"}


class Failure(Exception):
    """The command failed: one line for stderr, and the exit code."""

    def __init__(self, message: str, code: int = FAILED) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(USAGE, f"{self.prog}: error: {message}\n")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (0 < value <= 30 * 86_400):
        raise argparse.ArgumentTypeError(f"seconds in (0, 2592000], got {text!r}")
    return value


def _limit(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 1000:
        raise argparse.ArgumentTypeError(f"an integer in 1..1000, got {text!r}")
    return int(text)


def _reason(text: str) -> str:
    if len(text) > 200 or any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise argparse.ArgumentTypeError("at most 200 characters on one line")
    return text


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    # SUPPRESS: an option given before the command is not undone by the subcommand's default.
    common.add_argument(
        "--redis-url", default=argparse.SUPPRESS, help="Redis URL (default: REDIS_URL)"
    )
    common.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        metavar="PATH",
        help="YAML config file (default: GATEWAY_BREAKER_CONFIG)",
    )
    common.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print the package's log lines on stderr",
    )
    parser = _Parser(
        prog=PROG,
        description="Look at and steer the fleet's circuit breakers through Redis.",
        parents=[common],
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=help, parents=[common])

    sub = add("status", "every breaker's state as Redis holds it")
    sub.add_argument("--json", action="store_true", help="one JSON document")
    sub = add("watch", "print transitions as they happen, until interrupted")
    sub.add_argument("--json", action="store_true", help="one JSON object a line")
    for name, mode in MANUAL_COMMANDS.items():
        sub = add(name, f"put SERVICE in {mode}, fleet-wide")
        sub.add_argument("service", metavar="SERVICE")
        sub.add_argument(
            "--for", dest="seconds", type=_seconds, metavar="SECONDS", help="end it by itself"
        )
        sub.add_argument("--reason", type=_reason, help="why (shown in the history)")
    for name, help in [
        ("release", "lift SERVICE's manual mode, fleet-wide"),
        ("reset", "close SERVICE and clear its counters, fleet-wide"),
    ]:
        sub = add(name, help)
        sub.add_argument("service", metavar="SERVICE")
        sub.add_argument("--reason", type=_reason, help="why (shown in the history)")
    sub = add("history", "SERVICE's transitions, newest first")
    sub.add_argument("service", metavar="SERVICE")
    sub.add_argument("--limit", type=_limit, default=20, help="how many (1-1000, default 20)")
    sub.add_argument("--json", action="store_true", help="one JSON document")
    sub = add("fleet", "every live instance and its view of each breaker")
    sub.add_argument("--json", action="store_true", help="one JSON document")
    return parser


# -- talking to Redis ----------------------------------------------------------------------------


def load_config(args: argparse.Namespace) -> Config:
    overrides: dict[str, Any] = {}
    url = getattr(args, "redis_url", None)
    if url:
        overrides["redis"] = {"url": url}
    try:
        path = getattr(args, "config", None)
        config = Config.from_yaml(path, **overrides) if path else Config(**overrides)
    except ConfigError as exc:
        raise Failure(_one_line(str(exc)), USAGE) from None
    if config.redis.url is None:
        raise Failure("no Redis URL: give --redis-url or set REDIS_URL", USAGE)
    return config


async def open_manager(config: Config, services: Sequence[str] = ()) -> CircuitBreakerManager:
    """A short-lived manager on the fleet's Redis, `services` loaded, kept out of the fleet
    view; Failure if Redis does not answer."""
    from gateway_breaker.manager import CircuitBreakerManager

    manager = CircuitBreakerManager.from_config(config, register=False)
    await manager.start(services)
    if not manager.store_up:
        await manager.aclose()
        url = redact_url(str(config.redis.url))
        raise Failure(f"cannot reach Redis at {url}")
    return manager


async def known_services(manager: CircuitBreakerManager) -> list[str]:
    """Configured services, plus every service a live instance reports."""
    fleet = await manager.fleet()
    names = set(manager.services()) | set(fleet.store)
    for instance in fleet.instances:
        names.update(instance.breakers)
    return sorted(names)


async def needed_services(manager: CircuitBreakerManager, args: argparse.Namespace) -> list[str]:
    """The services the command acts on; Failure for an unknown one."""
    if args.command == "fleet":
        return []
    known = await known_services(manager)
    service = getattr(args, "service", None)
    if service is None:
        return known
    if service not in known:
        listed = ", ".join(known) if known else "none"
        raise Failure(f"unknown service {service!r} (known: {listed})")
    return [service]


# -- formatting ----------------------------------------------------------------------------------


def _one_line(text: str) -> str:
    return "; ".join(part.strip() for part in redact_secrets(text).splitlines() if part.strip())


def _when(at: float | None) -> str:
    if not at:
        return "-"
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = [headers, *rows]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def _manual_text(manual: dict[str, Any] | None) -> str:
    if not manual:
        return "-"
    text = str(manual["mode"])
    if manual.get("until"):
        text += f" until {_when(manual['until'])}"
    if manual.get("reason"):
        text += f" ({manual['reason']})"
    return text


def format_status(views: Sequence[dict[str, Any]]) -> str:
    rows = []
    for v in views:
        rate = v.get("failure_rate")
        health, shed = v.get("health"), v.get("rejection_probability")
        # Only an open breaker's retry time means something to an operator.
        retry = (v.get("retry_after") or 0) if v["state"] == "open" else 0
        rows.append(
            [
                v["service"],
                v["state"],
                str(v["failure_count"]),
                "-" if rate is None else f"{rate:.0%}",
                "-" if health is None else f"{health:.2f}",
                f"{shed:.0%}" if shed else "-",
                f"{retry:.1f}s" if retry else "-",
                str(v["version"]),
                "yes" if v.get("policy_overridden") else "-",
                _manual_text(v.get("manual")),
            ]
        )
    headers = ["SERVICE", "STATE", "FAILURES", "RATE", "HEALTH", "SHED", "RETRY", "VERSION"]
    headers += ["POLICY*", "MANUAL"]
    return _table(headers, rows) if rows else "no breakers known"


def format_history(events: Sequence[dict[str, Any]]) -> str:
    rows = [
        [
            _when(e["at"]),
            e["from"],
            e["to"],
            e["cause"],
            e["origin"],
            e["instance"],
            str(e["version"]),
            str(e.get("failure_count", 0)),
            e.get("reason") or "-",
        ]
        for e in events
    ]
    headers = ["AT", "FROM", "TO", "CAUSE", "ORIGIN", "INSTANCE", "VERSION", "FAILURES", "REASON"]
    return _table(headers, rows) if rows else "no transitions recorded"


def format_event(event: dict[str, Any]) -> str:
    text = (
        f"{_when(event['at'])} {event['service']} {event['from']} -> {event['to']}"
        f" cause={event['cause']} origin={event['origin']} instance={event['instance']}"
        f" version={event['version']}"
    )
    if event.get("reason"):
        text += f" reason={json.dumps(event['reason'])}"
    return text


def format_fleet(fleet: dict[str, Any], now: float, stale_after: float) -> str:
    store: dict[str, dict[str, Any]] = fleet.get("store", {})

    def breakers(entries: dict[str, dict[str, Any]], compare: bool) -> str:
        parts = []
        for name in sorted(entries):
            state, version = entries[name]["state"], entries[name]["version"]
            text = f"{name}={state}@{version}"
            held = store.get(name)
            if compare and held is not None and held["version"] != version:
                text += f" (store {held['state']}@{held['version']})"
            parts.append(text)
        return ", ".join(parts) or "-"

    rows = []
    for instance in fleet.get("instances", []):
        age = max(0.0, now - float(instance["last_seen"]))
        seen = f"{age:.1f}s ago" + (" STALE" if age > stale_after else "")
        rows.append(
            [
                instance["id"],
                str(instance["host"]),
                str(instance["pid"]),
                _when(instance["started_at"]),
                seen,
                str(instance.get("version", "-")),
                breakers(instance.get("breakers", {}), compare=True),
            ]
        )
    headers = ["INSTANCE", "HOST", "PID", "STARTED", "LAST SEEN", "VERSION", "BREAKERS"]
    text = _table(headers, rows) if rows else "no live instances"
    return text + f"\nstore: {breakers(store, compare=False)}"


# C0 (but newline), DEL, C1, and the bidirectional controls that reorder what a terminal shows.
_UNSAFE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def emit(text: str, *, error: bool = False, flush: bool = False) -> None:
    """Print `text`, with every control character from Redis (escape sequences, C1 and bidi
    controls) shown as an escape, never sent to the terminal."""
    print(_UNSAFE.sub(_escaped, text), file=sys.stderr if error else sys.stdout, flush=flush)


def _finite(data: Any) -> Any:
    """`data` with NaN and infinities as null: JSON has no such numbers."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {key: _finite(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [_finite(value) for value in data]
    return data


def _print_json(data: Any) -> None:
    # ASCII only: any other character (a C1 or bidi control among them) is a \u escape.
    print(json.dumps(_finite(data), indent=2, sort_keys=False, allow_nan=False))


# -- commands ------------------------------------------------------------------------------------


async def cmd_status(manager: CircuitBreakerManager, args: argparse.Namespace) -> int:
    views = [view.to_dict() for view in manager.views()]
    if args.json:
        _print_json({"store_up": manager.store_up, "breakers": views})
    else:
        emit(format_status(views))
    return OK


async def cmd_manual(manager: CircuitBreakerManager, args: argparse.Namespace) -> int:
    mode = MANUAL_COMMANDS[args.command]
    view = await manager.set_manual(args.service, mode, seconds=args.seconds, reason=args.reason)
    until = f" until {_when(view.manual.until)}" if view.manual and view.manual.until else ""
    emit(f"{args.service}: {view.state}{until} (version {view.version})")
    return OK


async def cmd_release(manager: CircuitBreakerManager, args: argparse.Namespace) -> int:
    view = await manager.clear_manual(args.service, reason=args.reason)
    emit(f"{args.service}: manual mode lifted, now {view.state} (version {view.version})")
    return OK


async def cmd_reset(manager: CircuitBreakerManager, args: argparse.Namespace) -> int:
    view = await manager.reset(args.service, reason=args.reason)
    emit(f"{args.service}: reset, now {view.state} (version {view.version})")
    return OK


async def cmd_history(manager: CircuitBreakerManager, args: argparse.Namespace) -> int:
    events = [e.to_dict() for e in await manager.history(args.service, limit=args.limit)]
    if args.json:
        _print_json({"service": args.service, "history": events})
    else:
        emit(format_history(events))
    return OK


async def cmd_fleet(manager: CircuitBreakerManager, args: argparse.Namespace) -> int:
    fleet = (await manager.fleet()).to_dict()
    if args.json:
        _print_json(fleet)
    else:
        stale_after = 3 * manager.config.redis.sync_interval_seconds + 1
        emit(format_fleet(fleet, time.time(), stale_after))
    return OK


async def cmd_watch(manager: CircuitBreakerManager, args: argparse.Namespace) -> int:
    print("watching transitions (Ctrl-C to stop)", file=sys.stderr)
    async for event in manager.events():
        data = event.to_dict()
        if args.json:
            print(json.dumps(_finite(data), allow_nan=False), flush=True)
        else:
            emit(format_event(data), flush=True)
    return OK


COMMANDS: dict[str, Callable[[Any, argparse.Namespace], Coroutine[Any, Any, int]]] = {
    "status": cmd_status,
    "watch": cmd_watch,
    "open": cmd_manual,
    "disable": cmd_manual,
    "metrics-only": cmd_manual,
    "release": cmd_release,
    "reset": cmd_reset,
    "history": cmd_history,
    "fleet": cmd_fleet,
}


async def run(args: argparse.Namespace) -> int:
    config = load_config(args)
    manager = await open_manager(config)
    try:
        services = await needed_services(manager, args)
        if any(manager.find(name) is None for name in services):
            # Known to the fleet but not configured here: load them before acting on them, so
            # a command builds on the fleet's state (loading at start is what waits for it).
            await manager.aclose()
            manager = await open_manager(config, services)
        return await COMMANDS[args.command](manager, args)
    except KeyError as exc:
        raise Failure(
            f"unknown service {exc.args[0]!r}" if exc.args else "unknown service"
        ) from None
    except StoreError as exc:
        # What the manager applied locally dies with this process: for the fleet, nothing
        # changed.
        what = getattr(exc, "operation", "store")
        raise Failure(f"Redis did not answer ({what}): nothing was changed") from None
    finally:
        with suppress(Exception):
            await manager.aclose()


@contextmanager
def _cli_logging(verbose: bool) -> Iterator[None]:
    """The package's log lines on stderr with -v, else none: the CLI says what went wrong
    itself, in one line, and the library's warnings would repeat it."""
    log = logging.getLogger("gateway_breaker")
    saved = log.propagate, log.level
    handler: logging.Handler = logging.NullHandler()
    if verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        log.setLevel(logging.DEBUG)
    log.propagate = False
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.propagate, log.level = saved


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: returns the exit code."""
    args = build_parser().parse_args(argv)
    with _cli_logging(bool(getattr(args, "verbose", False))):
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(run(args))
    except Failure as exc:
        emit(f"{PROG}: error: {exc}", error=True)
        return exc.code
    except KeyboardInterrupt:
        return OK if args.command == "watch" else 130
    except BrokenPipeError:
        return OK
    except Exception as exc:  # the promise: one line, never a traceback
        emit(f"{PROG}: error: {_one_line(f'{type(exc).__name__}: {exc}')}", error=True)
        return FAILED


if __name__ == "__main__":
    sys.exit(main())
