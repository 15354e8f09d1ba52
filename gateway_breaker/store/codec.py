"""The stored JSON of one breaker: the seed's fields plus a version. Strict on the way in."""

from __future__ import annotations

import json
import math
from typing import Any

from gateway_breaker.breaker import MANUAL_MODES, BreakerSnapshot, CircuitState, ManualMode

MAX_STATE_BYTES = 4096
MAX_REASON_CHARS = 200
_CAUSE_CHARS = 40
_MAX_COUNT = 2**53
_MAX_TIME = 2**41  # about the year 71,000: anything larger is not a Unix time


def encode_state(snapshot: BreakerSnapshot) -> str:
    """The seed's JSON without `version` (the store's write adds it). Times in Unix seconds.

    `state` is the seed's effective value ("open" while forced_open, "closed" while disabled
    or metrics_only), so seed readers keep working; `auto` then holds the automatic state.
    """
    manual = snapshot.manual
    state = snapshot.state.value
    if manual is not None:
        state = "open" if manual.mode == "forced_open" else "closed"
    opened_at = snapshot.opened_at
    if state == "open" and opened_at is None and manual is not None:
        opened_at = manual.since  # a seed reader needs the start of an open period
    doc: dict[str, Any] = {
        "state": state,
        "failure_count": snapshot.failure_count,
        "success_count": snapshot.success_count,
        "last_failure_time": _seconds(snapshot.last_failure_time),
        "opened_at": _seconds(opened_at),
        # The seed's whole seconds would end an open period up to 1 s early elsewhere.
        "opened_at_ms": None if snapshot.opened_at is None else round(snapshot.opened_at * 1000),
    }
    if snapshot.open_seconds is not None:
        doc["open_ms"] = max(1, round(snapshot.open_seconds * 1000))
    if state != snapshot.state.value:
        doc["auto"] = snapshot.state.value
    if manual is not None:
        doc["manual"] = {
            "mode": manual.mode,
            "until": None if manual.until is None else round(manual.until, 3),
            "reason": manual.reason,
            "since": None if manual.since is None else round(manual.since, 3),
        }
    if snapshot.cause is not None:
        doc["cause"] = snapshot.cause
    if snapshot.closed_at is not None:
        doc["closed_at_ms"] = round(snapshot.closed_at * 1000)  # the recovery ramp's start
    return json.dumps(doc, separators=(",", ":"))


def decode_state(raw: bytes | str) -> BreakerSnapshot:
    """Parse a stored state; raises ValueError saying what is wrong with it."""
    if len(raw) > MAX_STATE_BYTES:
        raise ValueError(f"value is {len(raw)} bytes, more than {MAX_STATE_BYTES}")
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    return state_from_doc(doc)


def state_from_doc(doc: object) -> BreakerSnapshot:
    """A stored state already parsed from JSON (an announcement carries one); raises
    ValueError saying what is wrong with it."""
    if not isinstance(doc, dict):
        raise ValueError(f"not a JSON object but {type(doc).__name__}")
    try:
        state = CircuitState(str(doc.get("state")))
        if "auto" in doc:
            state = CircuitState(str(doc["auto"]))
    except ValueError:
        raise ValueError(f"unknown state {str(doc.get('state'))[:40]!r}") from None
    manual = _manual(doc.get("manual"))
    opened_at = _time(doc, "opened_at")
    opened_at_ms = _time(doc, "opened_at_ms")
    # The precise time, unless a foreign writer left it disagreeing with the seed's field.
    if opened_at_ms is not None and (
        opened_at is None or abs(opened_at_ms / 1000 - opened_at) <= 1
    ):
        opened_at = opened_at_ms / 1000
    if state is CircuitState.OPEN and opened_at is None:
        raise ValueError("state is open but opened_at is missing")
    cause = doc.get("cause")
    if cause is not None and not (
        isinstance(cause, str) and 0 < len(cause) <= _CAUSE_CHARS and cause.isidentifier()
    ):
        raise ValueError(f"cause must be a short name, got {str(cause)[:40]!r}")
    return BreakerSnapshot(
        state=state,
        failure_count=_count(doc, "failure_count"),
        success_count=_count(doc, "success_count"),
        last_failure_time=_time(doc, "last_failure_time"),
        opened_at=opened_at,
        version=_count(doc, "version"),
        open_seconds=_open_seconds(doc),
        manual=manual,
        cause=cause,
        closed_at=_closed_at(doc, state),
    )


def _closed_at(doc: dict[str, Any], state: CircuitState) -> float | None:
    """When a probe closed the breaker (ms in the JSON); only a closed state has one."""
    value = _time(doc, "closed_at_ms")
    return None if value is None or state is not CircuitState.CLOSED else value / 1000


def _manual(value: Any) -> ManualMode | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError("manual must be an object")
    mode = value.get("mode")
    if mode not in MANUAL_MODES:
        raise ValueError(f"manual.mode must be one of {', '.join(MANUAL_MODES)}")
    reason = value.get("reason")
    if reason is not None and not (isinstance(reason, str) and len(reason) <= MAX_REASON_CHARS):
        raise ValueError(f"manual.reason must be text of at most {MAX_REASON_CHARS} characters")
    return ManualMode(
        mode=mode,
        until=_time(value, "until", "manual.until"),
        reason=reason,
        since=_time(value, "since", "manual.since"),
    )


def _open_seconds(doc: dict[str, Any]) -> float | None:
    value = doc.get("open_ms")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 86_400_000:
        raise ValueError(f"open_ms must be 1-86400000, got {str(value)[:40]!r}")
    return value / 1000


def _seconds(value: float | None) -> int | None:
    return None if value is None else int(value)


def _count(doc: dict[str, Any], name: str) -> int:
    value = doc.get(name, 0)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _MAX_COUNT:
        raise ValueError(f"{name} must be a non-negative integer, got {str(value)[:40]!r}")
    return value


def _time(doc: dict[str, Any], name: str, label: str | None = None) -> float | None:
    value = doc.get(name)
    if value is None or value == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{label or name} must be Unix seconds, got {str(value)[:40]!r}")
    limit = _MAX_TIME * 1000 if name.endswith("_ms") else _MAX_TIME
    # Range first: a huge int cannot even be turned into a float.
    if not 0 < value < limit or not math.isfinite(value):
        raise ValueError(f"{name} is out of range: {value!r}")
    return float(value)
