"""Property tests of the stored-state codec: whatever a foreign writer put under a state key,
`decode_state` returns a snapshot that satisfies the breaker's invariants or raises ValueError,
never anything else; and what `encode_state` writes (plus the version the store's script
appends) decodes back to the snapshot it came from, to the stored precision."""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway_breaker import BreakerSnapshot, CircuitState
from gateway_breaker.store.codec import MAX_STATE_BYTES, decode_state, encode_state

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FIELDS = (
    "state",
    "failure_count",
    "success_count",
    "last_failure_time",
    "opened_at",
    "opened_at_ms",
    "open_ms",
    "version",
)

# -- what a foreign writer could store -----------------------------------------------------------

HUGE_INTS = st.integers(min_value=-(10**400), max_value=10**400)
NUMBERS = st.one_of(
    st.integers(),
    HUGE_INTS,
    st.integers(min_value=2**52, max_value=2**64),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -0.0, 1e308, -1e308, 5e-324, 2**41, 2**41 * 1000, 2**53, 86_400_000]),
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=50))
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=25,
)
STATE_VALUES = st.one_of(
    st.sampled_from(["closed", "open", "half_open", "OPEN", " open", "opened", ""]),
    JSON_VALUES,
)
# A JSON number as a foreign writer may spell it, beyond what json.dumps produces.
NUMBER_LITERALS = st.from_regex(
    r"-?(0|[1-9][0-9]{0,400})(\.[0-9]{1,30})?([eE][+-]?[0-9]{1,5})?", fullmatch=True
)


@st.composite
def state_like_docs(draw: st.DrawFn) -> dict[str, Any]:
    """Objects with some of the real fields, each holding anything, plus random extra keys."""
    doc: dict[str, Any] = {}
    for name in FIELDS:
        if draw(st.integers(0, 3)):  # mostly present
            doc[name] = draw(STATE_VALUES if name == "state" else st.one_of(NUMBERS, JSON_VALUES))
    doc.update(draw(st.dictionaries(st.text(max_size=12), JSON_VALUES, max_size=3)))
    return doc


@st.composite
def plausible_docs(draw: st.DrawFn) -> str:
    """Close to a real state, with one or two fields spelled as arbitrary number literals."""
    doc = {
        "state": draw(st.sampled_from(["closed", "open", "half_open"])),
        "failure_count": 3,
        "success_count": 0,
        "last_failure_time": 1_795_000_000,
        "opened_at": 1_795_000_000,
        "opened_at_ms": 1_795_000_000_123,
        "version": 7,
    }
    text = json.dumps(doc)
    for name in draw(st.lists(st.sampled_from(FIELDS[1:]), min_size=1, max_size=2)):
        literal = draw(NUMBER_LITERALS | st.sampled_from(["NaN", "Infinity", "-Infinity"]))
        if f'"{name}": ' in text:
            start = text.index(f'"{name}": ') + len(name) + 4
            end = min(i for i in (text.find(",", start), text.find("}", start)) if i != -1)
            text = text[:start] + literal + text[end:]
        else:
            text = text[:-1] + f', "{name}": {literal}}}'
    return text


def nested(depth: int, inner: str = "1") -> str:
    return "[" * depth + inner + "]" * depth


FOREIGN = st.one_of(
    st.binary(max_size=600),
    st.binary(min_size=MAX_STATE_BYTES - 8, max_size=MAX_STATE_BYTES + 8),
    st.text(max_size=600),
    JSON_VALUES.map(lambda v: json.dumps(v)),
    JSON_VALUES.map(lambda v: json.dumps(v).encode("utf-16")),
    state_like_docs().map(json.dumps),
    state_like_docs().map(lambda d: json.dumps(d).encode()),
    plausible_docs(),
    st.integers(1, 3000).map(nested),
    st.integers(1, 1500).map(lambda n: '{"state": ' + nested(n, '"open"') + "}"),
    st.integers(1, 1000).map(lambda n: '{"state":"open","opened_at":1,"x":' + nested(n) + "}"),
    st.text(min_size=3000, max_size=5000).map(lambda s: json.dumps({"state": s})),
)


def check_invariants(snapshot: Any) -> None:
    assert isinstance(snapshot, BreakerSnapshot)
    assert isinstance(snapshot.state, CircuitState)
    for name in ("failure_count", "success_count", "version"):
        value = getattr(snapshot, name)
        assert type(value) is int, (name, value)
        assert value >= 0, (name, value)
    for name in ("last_failure_time", "opened_at", "open_seconds"):
        value = getattr(snapshot, name)
        if value is not None:
            assert type(value) is float, (name, value)
            assert math.isfinite(value), (name, value)
            assert value > 0, (name, value)
    if snapshot.state is CircuitState.OPEN:
        assert snapshot.opened_at is not None


@SETTINGS
@given(FOREIGN)
@example('{"state":"closed","opened_at":' + "9" * 400 + "}")
@example('{"state":"closed","last_failure_time":' + "9" * 400 + "}")
@example('{"state":"open","opened_at":1,"opened_at_ms":' + "1" * 400 + "}")
@example('{"state":"open","opened_at":1e400}')
@example(b'{"state":"open","opened_at":NaN}')
@example(b"\xff\xfe\x00garbage")
def test_decode_returns_a_sound_snapshot_or_raises_value_error(raw: bytes | str) -> None:
    try:
        snapshot = decode_state(raw)
    except ValueError:
        return
    check_invariants(snapshot)


# -- round trip ------------------------------------------------------------------------------------

# Unix seconds from 2001 to 2096, with fractions that include the edges of rounding to ms.
FRACTIONS = st.floats(min_value=0, max_value=1, exclude_max=True) | st.sampled_from(
    [0.0, 0.0004, 0.0005, 0.4995, 0.9994, 0.9995, 0.9996, 0.9999]
)
TIMES = st.builds(lambda s, f: s + f, st.integers(1_000_000_000, 4_000_000_000), FRACTIONS)
COUNTS = st.integers(0, 2**53 - 1)


@st.composite
def snapshots(draw: st.DrawFn, open_seconds: st.SearchStrategy[float | None]) -> BreakerSnapshot:
    state = draw(st.sampled_from(list(CircuitState)))
    opened_at = draw(TIMES if state is CircuitState.OPEN else st.none() | TIMES)
    return BreakerSnapshot(
        state=state,
        failure_count=draw(COUNTS),
        success_count=draw(COUNTS),
        last_failure_time=draw(st.none() | TIMES),
        opened_at=opened_at,
        version=draw(COUNTS),
        open_seconds=draw(open_seconds),
    )


def as_stored(snapshot: BreakerSnapshot) -> str:
    """What Redis holds after the write script: the encoded state with its version appended."""
    encoded = encode_state(snapshot)
    assert encoded.endswith("}")
    return encoded[:-1] + f',"version":{snapshot.version}}}'


def check_round_trip(snapshot: BreakerSnapshot, open_precision: float = 0.0005) -> None:
    stored = as_stored(snapshot)
    json.loads(stored)  # well-formed JSON
    decoded = decode_state(stored)
    check_invariants(decoded)
    assert decoded.state is snapshot.state
    assert decoded.failure_count == snapshot.failure_count
    assert decoded.success_count == snapshot.success_count
    assert decoded.version == snapshot.version
    # The seed's format keeps last_failure_time in whole seconds.
    if snapshot.last_failure_time is None:
        assert decoded.last_failure_time is None
    else:
        assert decoded.last_failure_time == float(int(snapshot.last_failure_time))
    # opened_at keeps milliseconds (opened_at_ms): an open period ends at the same moment
    # everywhere, never a second early.
    if snapshot.opened_at is None:
        assert decoded.opened_at is None
    else:
        assert decoded.opened_at is not None
        assert abs(decoded.opened_at - snapshot.opened_at) <= 0.0005 + 1e-6, (
            f"opened_at {snapshot.opened_at!r} came back as {decoded.opened_at!r}"
        )
    if snapshot.open_seconds is None:
        assert decoded.open_seconds is None
    else:
        assert decoded.open_seconds is not None
        assert abs(decoded.open_seconds - snapshot.open_seconds) <= open_precision + 1e-9


@SETTINGS
@given(snapshots(st.none() | st.floats(min_value=0.001, max_value=86_400)))
@example(BreakerSnapshot(CircuitState.OPEN, 3, 0, 1_795_000_000.0, 1_795_000_000.9996, 7))
def test_encoded_states_decode_to_what_was_encoded(snapshot: BreakerSnapshot) -> None:
    check_round_trip(snapshot)


@SETTINGS
@given(snapshots(st.floats(min_value=1e-6, max_value=0.001)))
def test_sub_millisecond_open_periods_round_trip(snapshot: BreakerSnapshot) -> None:
    """`Policy` allows any timeout above 0, so a breaker may share an open period under 1 ms;
    what it writes must be readable again (else its own write is 'unusable' state), to the
    stored precision of a millisecond."""
    check_round_trip(snapshot, open_precision=0.001)
