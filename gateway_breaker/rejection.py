"""The 503 a breaker answers instead of calling the app, made once and reused.

Rejecting is the load-shedding path: while a breaker is open it may answer most of a gateway's
traffic, so it must cost less than letting a request through. Everything in the answer is fixed
by the service, the reported state and the Retry-After value, and Retry-After changes at most
once a second: the header list and the body are built the first time a combination is needed
and kept (a bounded number of them), so a rejection only looks them up.
"""

from __future__ import annotations

# Combinations kept at once: services x states x Retry-After values (whole seconds) in use.
MAX_KEPT = 4096

Headers = list[tuple[bytes, bytes]]


class Rejections:
    """Header lists and problem+json bodies of 503s, by (service, state, Retry-After)."""

    __slots__ = ("_made",)

    def __init__(self) -> None:
        self._made: dict[tuple[str, str, int], tuple[Headers, bytes]] = {}

    def answer(self, service: str, state: str, retry_after: int) -> tuple[Headers, bytes]:
        """The headers and body of the 503 for `service` in `state` (already the reported one:
        "open", "half_open", "forced_open", "recovering", ...), `retry_after` whole seconds."""
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
