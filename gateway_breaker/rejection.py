"""The 503 a breaker answers instead of calling the app, made once and reused.

Rejecting is the load-shedding path: while a breaker is open it may answer most of a gateway's
traffic, so it must cost less than letting a request through. Everything in the answer is fixed
by the service, the reported state and the Retry-After value, and Retry-After changes at most
once a second: the header list and the body are built the first time a combination is needed
and kept (a bounded number of them). The middleware keeps an open breaker's answer with the
second it holds for (`open_answer`), so that rejecting is a clock read and a comparison.
"""

from __future__ import annotations

import math

from gateway_breaker.breaker import CircuitBreaker

# Combinations kept at once: services x states x Retry-After values (whole seconds) in use.
MAX_KEPT = 4096

Headers = list[tuple[bytes, bytes]]
# An open breaker's answer: (open_until, low, high, headers, body), for clock values in [low, high).
OpenAnswer = tuple[float, float, float, Headers, bytes]


class Rejections:
    """Header lists and problem+json bodies of 503s, by (service, state, Retry-After)."""

    __slots__ = ("_made",)

    def __init__(self) -> None:
        self._made: dict[tuple[str, str, int], tuple[Headers, bytes]] = {}

    def of(self, breaker: CircuitBreaker) -> tuple[Headers, bytes]:
        """The 503 for a call `breaker` just rejected, in the state it reports."""
        state = breaker.effective_state
        if state == "closed":
            # Closed: the adaptive mode shed this request, or the recovery ramp held it back.
            state = "shedding" if breaker.shed_last else "recovering"
        return self.answer(breaker.name, state, breaker.retry_after_header())

    def open_answer(self, service: str, until: float, now: float) -> OpenAnswer:
        """The 503 of an automatic open breaker at `now` (before `until`, the end of its open
        period), with the clock range [low, high) it holds for: Retry-After is
        ceil(until - now), the same from until - r to until - r + 1 (and `high` <= `until`)."""
        retry_after = max(1, math.ceil(until - now))
        headers, body = self.answer(service, "open", retry_after)
        return until, until - retry_after, until - retry_after + 1, headers, body

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
