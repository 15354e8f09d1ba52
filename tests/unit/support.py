"""Builders shared by the unit tests."""

from __future__ import annotations

from typing import Any

from starlette.types import ASGIApp, Message

from gateway_breaker import Config, Policy


def make_policy(**overrides: Any) -> Policy:
    """A policy with small, test-friendly numbers; keyword arguments override them.

    `min_calls` is high so only consecutive failures open the breaker unless a test asks for
    the error-rate rule.
    """
    values: dict[str, Any] = {
        "failure_threshold": 3,
        "error_rate_threshold": 0.5,
        "window_seconds": 10.0,
        "min_calls": 1_000,
        "timeout_seconds": 10.0,
        "half_open_max_calls": 1,
        "success_threshold": 1,
    }
    values.update(overrides)
    return Policy.model_validate(values)


def make_config(services: dict[str, dict[str, Any]], **circuit_breaker: Any) -> Config:
    """A Config holding the given services, from keyword arguments only (env is cleared)."""
    return Config(circuit_breaker={"services": services, **circuit_breaker})


async def asgi_get(
    app: ASGIApp, path: str, *, root_path: str = "", kind: str = "http"
) -> list[Message]:
    """Call `app` with a bodyless GET of `path` (raw ASGI); return the messages it sent."""
    messages: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        messages.append(message)

    scope = {
        "type": kind,
        "method": "GET",
        "path": path,
        "raw_path": path.encode(),
        "root_path": root_path,
        "query_string": b"",
        "headers": [],
    }
    await app(scope, receive, send)
    return messages
