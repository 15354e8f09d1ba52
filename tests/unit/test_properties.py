"""Property tests: the breaker's invariants under random call sequences, route matching against a
naive reference, and status-code parsing that fails only with validation errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from gateway_breaker import (
    CircuitBreaker,
    CircuitState,
    Config,
    ConfigError,
    Permit,
    Policy,
    RouteTable,
)
from tests.helpers import FakeClock

CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN
LEGAL_EDGES = {(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED), (HALF_OPEN, OPEN)}
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- the breaker -------------------------------------------------------------------------------


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    timeout = draw(st.sampled_from([1.0, 2.5, 5.0, 10.0]))
    values: dict[str, Any] = {
        "failure_threshold": draw(st.integers(1, 4)),
        "error_rate_threshold": draw(st.sampled_from([0.1, 0.5, 0.75, 1.0])),
        "window_seconds": draw(st.sampled_from([1.0, 5.0, 10.0])),
        "min_calls": draw(st.integers(1, 8)),
        "timeout_seconds": timeout,
        "half_open_max_calls": draw(st.integers(1, 3)),
        "success_threshold": draw(st.integers(1, 3)),
        "slow_call_seconds": draw(st.none() | st.sampled_from([0.5, 2.0])),
    }
    if "max_timeout_seconds" in Policy.model_fields and draw(st.booleans()):
        values["max_timeout_seconds"] = timeout * draw(st.sampled_from([1, 2, 8]))
    return Policy.model_validate(values)


# record/release pick a permit: 0-3 count back from the newest unfinished one, 4-9 pick any
# permit ever issued (finished or stale ones included, to exercise idempotency and generations).
ACQUIRE = st.just(("acquire",))
RECORD = st.tuples(st.just("record"), st.integers(0, 9), st.booleans())
RELEASE = st.tuples(st.just("release"), st.integers(0, 9))
ADVANCE = st.tuples(st.just("advance"), st.sampled_from([0.1, 0.5, 1.0, 2.4, 3.0, 10.0, 30.0]))
OPS = st.lists(
    st.one_of(ACQUIRE, ACQUIRE, RECORD, RECORD, RECORD, RELEASE, ADVANCE, ADVANCE),
    min_size=10,
    max_size=150,
)


@dataclass
class Issued:
    permit: Permit
    generation: int
    probe: bool
    finished: bool = False
    started: float = 0.0


@dataclass
class Model:
    """What the test knows from the outside: permits it holds and transitions it saw."""

    issued: list[Issued] = field(default_factory=list)
    transitions: list[tuple[CircuitState, CircuitState, int]] = field(default_factory=list)

    def pick(self, choice: int) -> Issued:
        unfinished = [i for i in self.issued if not i.finished]
        if choice < 4 and unfinished:
            return unfinished[-1 - choice % len(unfinished)]
        return self.issued[choice * 7919 % len(self.issued)]

    def live_probes(self, generation: int) -> int:
        return sum(
            1 for i in self.issued if i.probe and not i.finished and i.generation == generation
        )


def check_invariants(breaker: CircuitBreaker, model: Model, clock: FakeClock) -> None:
    policy = breaker.policy
    live = model.live_probes(breaker.generation)
    assert 0 <= live <= policy.half_open_max_calls
    assert 0 <= breaker._in_flight <= policy.half_open_max_calls
    assert breaker._in_flight == live
    if breaker.state is not HALF_OPEN:
        assert live == 0
    assert breaker.failure_count >= 0
    assert breaker.success_count >= 0
    header = breaker.retry_after_header()
    assert isinstance(header, int)
    assert header >= 1
    assert breaker.retry_after() >= 0
    if breaker.state is OPEN:
        assert breaker.opened_at is not None
        assert breaker.opened_at <= clock.now
        assert breaker.open_until >= breaker.opened_at + policy.timeout_seconds - 1e-9


@SETTINGS
@given(policy=policies(), ops=OPS, start_open=st.booleans())
def test_breaker_invariants_hold_for_any_sequence(
    policy: Policy, ops: list[tuple[Any, ...]], start_open: bool
) -> None:
    if start_open:  # spend more of the run around the open and half-open states
        opening = [("acquire",), ("record", 0, True)] * policy.failure_threshold
        ops = [*opening, ("advance", policy.timeout_seconds), *ops]
    clock = FakeClock()
    model = Model()

    def on_transition(breaker: CircuitBreaker, previous: CircuitState) -> None:
        model.transitions.append((previous, breaker.state, breaker.generation))

    breaker = CircuitBreaker("svc", policy, clock=clock, on_transition=on_transition)

    for op in ops:
        state_before = breaker.state
        generation_before = breaker.generation
        seen_before = len(model.transitions)

        if op[0] == "acquire":
            live_before = model.live_probes(breaker.generation)
            live = [
                i
                for i in model.issued
                if i.probe and not i.finished and i.generation == breaker.generation
            ]
            # A probe past its deadline gives its slot up when the slots are full.
            deadline = policy.slow_call_seconds or policy.probe_lease_seconds
            overdue = (
                state_before is HALF_OPEN
                and live_before >= policy.half_open_max_calls
                and clock.now - live[0].started > deadline
            )
            if overdue:
                live[0].finished = True
                live[0].generation = -1  # its outcome counts for nothing
                live_before -= 1
            got = breaker.acquire()
            if state_before is CLOSED:
                assert got is not None, "a closed breaker rejected a call"
                assert not got.probe
            if state_before is OPEN:
                assert breaker.opened_at is not None
                if clock.now < breaker.opened_at + policy.timeout_seconds:
                    assert got is None, "an open breaker let a call through before its timeout"
            if state_before is HALF_OPEN and overdue and policy.slow_call_seconds is not None:
                # Slower than slow_call_seconds: the probe failed, and the breaker reopened.
                assert got is None
                assert breaker.state is OPEN
            elif state_before is HALF_OPEN:
                # Only a full set of probes (or a transition) makes a half-open breaker reject.
                assert (got is None) == (live_before >= policy.half_open_max_calls)
            if got is not None:
                model.issued.append(Issued(got, breaker.generation, got.probe, started=clock.now))
        elif op[0] == "advance":
            clock.advance(op[1])
        elif model.issued:
            item = model.pick(op[1])
            stale = item.generation != breaker.generation
            snapshot_before = breaker.snapshot()
            if op[0] == "record":
                breaker.record(item.permit, failed=op[2])
            else:
                breaker.release(item.permit)
            if stale or item.finished or op[0] == "release":
                # Stale, repeated or released: outcomes change nothing.
                assert breaker.snapshot() == snapshot_before
                assert breaker.generation == generation_before
            item.finished = True

        # State moves along one legal edge at most, and every move is reported once.
        new = model.transitions[seen_before:]
        assert len(new) <= 1
        if breaker.state is not state_before or breaker.generation != generation_before:
            assert len(new) == 1
        for previous, state, generation in new:
            assert (previous, state) in LEGAL_EDGES
            assert previous is state_before
            assert state is breaker.state
            assert generation == breaker.generation
        if not new:
            assert breaker.generation == generation_before
            assert breaker.state is state_before
        else:
            assert breaker.generation > generation_before

        check_invariants(breaker, model, clock)

    generations = [g for _, _, g in model.transitions]
    assert generations == sorted(set(generations)), "generations must strictly increase"


@SETTINGS
@given(policy=policies(), failures=st.integers(1, 10))
def test_consecutive_failures_at_the_threshold_always_open(policy: Policy, failures: int) -> None:
    breaker = CircuitBreaker("svc", policy, clock=FakeClock())
    for i in range(failures):
        permit = breaker.acquire()
        if permit is None:
            break
        breaker.record(permit, failed=True)
        if i + 1 >= policy.failure_threshold:
            assert breaker.state is OPEN
    if failures < policy.failure_threshold and failures < policy.min_calls:
        assert breaker.state is CLOSED


# -- routes ------------------------------------------------------------------------------------

SEGMENTS = st.one_of(
    st.sampled_from(
        [
            "a",
            "ab",
            "api",
            "v2",
            "sona",
            "sonar",
            "%",
            "%2F",
            "%2e%2e",
            "..",
            ".",
            "é",
            "日本",
            "a b",
        ]
    ),
    st.text(alphabet="ab%./é-_~ 日", min_size=1, max_size=4).filter(lambda s: "/" not in s),
)
PATH_SEGMENTS = st.one_of(SEGMENTS, st.just(""))  # "" makes '//' in a path


@st.composite
def route_tables(draw: st.DrawFn) -> dict[str, str]:
    routes: dict[str, str] = {}
    normalized: set[str] = set()
    for i, segments in enumerate(draw(st.lists(st.lists(PATH_SEGMENTS, max_size=4), max_size=6))):
        prefix = "/" + "/".join(segments)
        key = prefix.rstrip("/")
        if key in normalized:
            continue
        normalized.add(key)
        if draw(st.booleans()) and not prefix.endswith("/"):
            prefix += "/"  # a trailing slash in the configuration is ignored
        routes[prefix] = f"svc{i}"
    return routes


@st.composite
def paths_for(draw: st.DrawFn, routes: dict[str, str]) -> str:
    base = ""
    use_a_prefix: bool = draw(st.booleans())
    if routes and use_a_prefix:
        base = draw(st.sampled_from(sorted(routes))).rstrip("/")
        if draw(st.booleans()) and base:
            base = base[: draw(st.integers(1, len(base)))]  # a cut inside a segment
    tail = draw(st.lists(PATH_SEGMENTS, max_size=6))
    if draw(st.integers(0, 9)) == 0:
        tail += ["seg"] * draw(st.integers(50, 400))  # long paths
    path = base + ("/" + "/".join(tail) if tail else "")
    if draw(st.booleans()):
        path += "/"
    return path if path.startswith("/") else "/" + path


def naive_match(routes: dict[str, str], path: str) -> str | None:
    best: str | None = None
    best_length = -1
    for prefix, service in routes.items():
        p = prefix.rstrip("/")
        covered = p == "" or path == p or path.startswith(p + "/")
        if covered and len(p) > best_length:
            best, best_length = service, len(p)
    return best


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_route_table_agrees_with_the_naive_reference(data: st.DataObject) -> None:
    routes = data.draw(route_tables())
    table = RouteTable(routes)
    for _ in range(5):
        path = data.draw(paths_for(routes))
        assert table.match(path) == naive_match(routes, path), (routes, path)


@settings(max_examples=200, deadline=None)
@given(routes=route_tables())
def test_every_prefix_matches_itself_and_below_but_not_a_longer_segment(
    routes: dict[str, str],
) -> None:
    table = RouteTable(routes)
    for prefix, service in routes.items():
        p = prefix.rstrip("/")
        if not p:
            continue
        assert table.match(p) == service
        assert table.match(p + "/") == service
        deeper = table.match(p + "/x/y")
        assert deeper is not None
        assert deeper == naive_match(routes, p + "/x/y")
        assert table.match(p + "x") == naive_match(routes, p + "x")


# -- failure_status_codes ----------------------------------------------------------------------

SCALARS = st.one_of(
    st.integers(-(10**6), 10**6),
    st.integers(100, 599),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.from_regex(r"\A\s*\d{1,4}\s*-\s*\d{1,4}\s*\Z"),
    st.from_regex(r"\A\s*[0-9][xX]{2}\s*\Z"),
    st.from_regex(r"\A\s*\d{1,5}\s*\Z"),
    st.binary(max_size=4),
    st.sampled_from(
        [
            "5xx",
            "500-599",
            "4XX",
            "\u0665\u0660\u0660",  # 500 in Arabic-Indic digits
            "\u00b2\u2070\u2070",  # superscript digits
            "9" * 5000,  # beyond int()'s digit limit
            "1e3",
            "0x1F4",
            "",
            " ",
        ]
    ),
)
STATUS_VALUES = st.one_of(
    SCALARS,
    st.lists(SCALARS, max_size=6),
    st.tuples(SCALARS, SCALARS),
    st.frozensets(st.integers(100, 599) | st.sampled_from(["5xx", "429"]), max_size=4),
    st.dictionaries(st.text(max_size=3), SCALARS, max_size=2),
    st.lists(st.lists(SCALARS, max_size=2), max_size=2),
)


@settings(max_examples=400, deadline=None)
@given(value=STATUS_VALUES)
def test_status_code_parsing_fails_only_with_validation_errors(value: Any) -> None:
    try:
        policy = Policy(failure_status_codes=value)
    except ValidationError as exc:
        error = str(exc)
    except Exception as exc:  # anything else is a bug in the parser
        raise AssertionError(f"{type(exc).__name__} for {value!r}: {exc}") from exc
    else:
        error = ""
    if error:
        assert "failure_status_codes" in error
        return
    codes = policy.failure_status_codes
    assert codes
    assert all(isinstance(code, int) and 100 <= code <= 599 for code in codes)


@settings(max_examples=150, deadline=None)
@given(value=STATUS_VALUES)
def test_status_code_errors_in_config_are_config_errors(value: Any) -> None:
    error = ""
    try:
        Config(circuit_breaker={"services": {"sona": {"failure_status_codes": value}}})
    except ConfigError as exc:
        error = str(exc)
    except Exception as exc:
        raise AssertionError(f"{type(exc).__name__} for {value!r}: {exc}") from exc
    if error:
        assert "circuit_breaker.services.sona.failure_status_codes" in error


@settings(max_examples=200, deadline=None)
@given(codes=st.lists(st.integers(100, 599), min_size=1, max_size=10))
def test_integer_status_codes_parse_to_themselves(codes: list[int]) -> None:
    assert Policy(failure_status_codes=codes).failure_status_codes == set(codes)


@settings(max_examples=200, deadline=None)
@given(low=st.integers(100, 599), high=st.integers(100, 599), spaces=st.sampled_from(["", " "]))
def test_ranges_parse_to_their_codes(low: int, high: int, spaces: str) -> None:
    assume(low <= high)
    text = f"{low}{spaces}-{spaces}{high}"
    assert Policy(failure_status_codes=text).failure_status_codes == set(range(low, high + 1))


@settings(max_examples=20, deadline=None)
@given(digit=st.integers(1, 5), x=st.sampled_from(["xx", "XX", "xX"]))
def test_classes_parse_to_their_hundred(digit: int, x: str) -> None:
    expected = set(range(digit * 100, digit * 100 + 100))
    assert Policy(failure_status_codes=f"{digit}{x}").failure_status_codes == expected
