"""The 503 a breaker answers instead of calling the app, made once and reused.

Rejecting is the load-shedding path: while a breaker is open it may answer most of a gateway's
traffic, so it must cost less than letting a request through. Everything in the answer is fixed
by the service, the reported state and the Retry-After value, and Retry-After changes at most
once a second: the header list and the body are built the first time a combination is needed
and kept (a bounded number of them), so a rejection only looks them up.
"""

from __future__ import annotations

import math

from gateway_breaker.breaker import CircuitBreaker, CircuitState

_OPEN = CircuitState.OPEN
_FOREVER = math.inf

# Combinations kept at once: services x states x Retry-After values (whole seconds) in use.
MAX_KEPT = 4096

Headers = list[tuple[bytes, bytes]]


class Rejections:
    """Header lists and problem+json bodies of 503s, by (service, state, Retry-After)."""

    __slots__ = ("_made", "_open")

    def __init__(self) -> None:
        self._made: dict[tuple[str, str, int], tuple[Headers, bytes]] = {}
        # By service, while open: (open_until, clock range the answer holds for, the answer).
        self._open: dict[str, tuple[float, float, float, Headers, bytes]] = {}

    def of(self, breaker: CircuitBreaker) -> tuple[Headers, bytes]:
        """The 503 for a call `breaker` just rejected.

        The usual case, an automatic open breaker, is answered from the last answer while the
        clock is in the second it holds for (Retry-After = ceil(open_until - now), at least 1):
        one clock read and a few comparisons. Everything else (manual modes, half-open, the
        recovery ramp) asks the breaker.
        """
        if breaker.state is _OPEN and breaker.manual is None:
            now = breaker.clock()
            until = breaker.open_until
            kept = self._open.get(breaker.name)
            if kept is not None and kept[0] == until and kept[1] < now <= kept[2]:
                return kept[3], kept[4]
            return self._open_answer(breaker.name, until, now)
        state = breaker.effective_state
        if state == "closed":
            # Closed: the adaptive mode shed this request, or the recovery ramp held it back.
            state = "shedding" if breaker.shed_last else "recovering"
        return self.answer(breaker.name, state, breaker.retry_after_header())

    def while_open(self, breaker: CircuitBreaker) -> tuple[Headers, bytes] | None:
        """For an automatic open breaker (state open, no manual mode): the 503 when the clock is
        still inside its open period, the call counted as rejected; None once the period is over
        (`acquire` decides then: the probe). One clock read, no permit."""
        now = breaker.clock()
        until = breaker.open_until
        if now >= until:
            return None
        breaker.calls_rejected += 1
        kept = self._open.get(breaker.name)
        if kept is not None and kept[0] == until and kept[1] < now <= kept[2]:
            return kept[3], kept[4]
        return self._open_answer(breaker.name, until, now)

    def _open_answer(self, service: str, until: float, now: float) -> tuple[Headers, bytes]:
        retry_after = max(1, math.ceil(until - now))
        headers, body = self.answer(service, "open", retry_after)
        # ceil(until - now) == retry_after for now in (until - r, until - r + 1]; 1 also after.
        high = until - retry_after + 1 if retry_after > 1 else _FOREVER
        self._open[service] = (until, until - retry_after, high, headers, body)
        return headers, body

    def answer(self, service: str, state: str, retry_after: int) -> tuple[Headers, bytes]:
        """The headers and body of the 503 for `service` in `state` (already the reported one:
        "open", "half_open", "forced_open", "recovering", "shedding", ...), `retry_after` whole
        seconds."""
        key = (service, state, retry_after)
        made = self._made.get(key)
        if made is None:
            if len(self._made) >= MAX_KEPT:
                self._made.clear()  # long open periods count down through many values
            made = self._made[key] = build(service, state, retry_after)
        return made


def build(service: str, state: str, retry_after: int) -> tuple[Headers, bytes]:
    # Service names are validated (letters, digits, '_', '.', '-'): nothing to escape.
    body = (
        '{"type":"about:blank","title":"Service Unavailable","status":503,'
        f'"detail":"Circuit breaker for service \'{service}\' is {state}",'
        f'"service":"{service}","state":"{state}","retry_after":{retry_after}}}'
    ).encode()
    headers = [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(retry_after).encode()),
        (b"cache-control", b"no-store"),
        (b"x-circuit-breaker", state.encode()),  # tells breaker 503s from upstream 503s
    ]
    return headers, body
