"""The package's other Redis values, checked as strictly as the state key (store/codec.py).

Instance entries, history entries and policy overrides are read from a shared Redis that
anyone with access may write to. Each reader here returns the value, or None for one that is
unusable (wrong shape, non-finite or absurd numbers, oversized text); the caller leaves it out
and counts it in `Rejections`, which logs the first of each kind.
"""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Any

from gateway_breaker.policy import MAX_OVERRIDE_BYTES
from gateway_breaker.store.codec import MAX_REASON_CHARS
from gateway_breaker.views import InstanceView, TransitionEvent

logger = logging.getLogger("gateway_breaker")

MAX_POLICY_BYTES = MAX_OVERRIDE_BYTES
MAX_INSTANCE_BYTES = 1 << 20
MAX_INSTANCE_BREAKERS = 100_000
MAX_FIELD_BYTES = 1024
"""Any one field of a history entry as the store returns it (a reason is 200 characters)."""
_MAX_INT = 2**53
_MAX_TIME = 2**41  # Unix seconds: about the year 71,000
_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_WORD = re.compile(r"^[a-z_]{1,40}$")


class Rejections:
    """Unusable values read from Redis, counted by kind; the first of each kind is logged."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def __call__(self, kind: str, detail: str) -> None:
        seen = self.counts.get(kind, 0)
        self.counts[kind] = seen + 1
        if not seen:
            logger.warning(
                "Ignoring an unusable value in Redis (kind=%s, error=%s); further ones of this"
                " kind are counted, not logged",
                kind,
                detail[:200],
            )


def _int(value: Any, low: int = 0, high: int = _MAX_INT) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"not an integer: {type(value).__name__}")
    if isinstance(value, str):
        digits = value.removeprefix("-")
        if not (0 < len(digits) <= 20 and digits.isascii() and digits.isdigit()):
            raise ValueError("not an integer")
    number = int(value)
    if not low <= number < high:
        raise ValueError(f"integer out of range: {number}")
    return number


def _time(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("not a time")
    if isinstance(value, int) and not 0 <= value < _MAX_TIME:
        raise ValueError("time out of range")
    if not (math.isfinite(value) and 0 <= value < _MAX_TIME):
        raise ValueError("time out of range")
    return float(value)


def _text(value: Any, limit: int) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise ValueError(f"not text of at most {limit} characters")
    return value


def instance_view(raw: bytes | str, shift: float) -> InstanceView:
    """One instance entry (`{prefix}:instance:{id}`); raises ValueError saying what is wrong."""
    doc = _json_object(raw, MAX_INSTANCE_BYTES)
    entries = doc.get("breakers", {})
    if not isinstance(entries, dict) or len(entries) > MAX_INSTANCE_BREAKERS:
        raise ValueError("breakers must be an object")
    breakers: dict[str, tuple[str, int]] = {}
    for name, entry in entries.items():
        if not _NAME.match(name) or not isinstance(entry, dict):
            raise ValueError("a breaker entry is not one")
        state = entry.get("state")
        if not isinstance(state, str) or not _WORD.match(state):
            raise ValueError("a breaker's state is not a short name")
        breakers[name] = (state, _int(entry.get("version")))
    return InstanceView(
        id=_text(doc.get("id"), 64),
        host=_text(doc.get("host"), 255),
        pid=_int(doc.get("pid"), 0, 2**32),
        started_at=_time(doc.get("started_at")) + shift,
        last_seen=_time(doc.get("last_seen")) + shift,
        version=_text(doc.get("version"), 64),
        breakers=breakers,
    )


def history_event(service: str, fields: Any, shift: float) -> TransitionEvent:
    """One history stream entry; raises ValueError when it is not one the package wrote."""
    if not isinstance(fields, dict):
        raise ValueError("not a stream entry")
    get: dict[str, str] = {}
    for key, value in fields.items():
        if not isinstance(key, bytes) or not isinstance(value, bytes):
            raise ValueError("not a stream entry")
        if len(value) > MAX_FIELD_BYTES:
            raise ValueError(f"field {key[:40]!r} is over {MAX_FIELD_BYTES} bytes")
        get[key.decode()] = value.decode()
    rate = get.get("failure_rate") or ""
    failure_rate = None
    if rate:
        failure_rate = float(rate)
        if not 0 <= failure_rate <= 1:  # NaN fails this too
            raise ValueError("failure_rate out of range")
    reason = get.get("reason") or None
    if reason is not None and len(reason) > MAX_REASON_CHARS:
        raise ValueError(f"reason over {MAX_REASON_CHARS} characters")
    names = {}
    for name in ("from", "to", "cause", "origin"):
        if not _WORD.match(get.get(name, "")):
            raise ValueError(f"{name} is not a short name")
        names[name] = get[name]
    return TransitionEvent(
        service=service,
        at=_int(get.get("at"), 0, _MAX_TIME * 1000) / 1000 + shift,
        from_state=names["from"],
        to_state=names["to"],
        cause=names["cause"],
        origin=names["origin"],
        instance=_text(get.get("instance"), 64),
        version=_int(get.get("version")),
        failure_count=_int(get.get("failure_count")),
        failure_rate=failure_rate,
        reason=reason,
    )


def encode_policy(fields: dict[str, object]) -> str:
    """A policy override as stored; ValueError when it is over MAX_POLICY_BYTES (no instance
    would read it back)."""
    text = json.dumps(fields, separators=(",", ":"), allow_nan=False)
    if len(text.encode()) > MAX_POLICY_BYTES:
        raise ValueError(f"the override is over {MAX_POLICY_BYTES} bytes of JSON")
    return text


def decode_policy(raw: bytes | str) -> dict[str, object]:
    """A stored policy override; ValueError for an unusable one (the policy model checks the
    fields themselves when it is applied)."""
    return _json_object(raw, MAX_POLICY_BYTES)


def _json_object(raw: bytes | str, limit: int) -> dict[str, Any]:
    """`raw` as a JSON object of at most `limit` bytes; ValueError saying what is wrong."""
    if len(raw) > limit:
        raise ValueError(f"{len(raw)} bytes, more than {limit}")
    try:
        doc = json.loads(raw, parse_constant=_no_constant)
    except (UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"not JSON: {type(exc).__name__}") from None
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    return doc


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")
