"""Errors raised by gateway_breaker."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError

# Inputs of these fields may carry secrets and are never echoed in an error.
_SECRET_FIELDS = ("url", "password", "sentinel_password", "token")
# Anything shaped like credentials before an '@' (user:password@), in a URL or a broken one.
_CREDENTIALS = re.compile(r"[^\s@'\"]*:[^\s@'\"]*@")
# A URL query option that carries a secret (`?password=...`, `&sentinel_password=...`).
SECRET_QUERY = re.compile(
    r"(?i)((?:^|[?&;\s'\"])[^=&#\s'\"]*(?:pass|token|secret|auth)[^=&#\s'\"]*=)[^&#\s'\"]*"
)


def redact_secrets(text: str) -> str:
    """`text` with the credentials of any URL in it replaced by '***'."""
    return SECRET_QUERY.sub(r"\1***", _CREDENTIALS.sub("***@", text))


class GatewayBreakerError(Exception):
    """Base class of this package's errors."""


class ConfigError(GatewayBreakerError, ValueError):
    """The configuration is invalid; the message names the field or file."""

    @classmethod
    def from_validation(
        cls,
        exc: ValidationError,
        source: os.PathLike[str] | str | None = None,
        env: Mapping[int, str] | None = None,
    ) -> ConfigError:
        """`env`: error index -> the environment variable its value came from."""
        env = env or {}
        lines = []
        for i, error in enumerate(exc.errors()):
            where = ".".join(str(part) for part in error["loc"]) or "(root)"
            message = error["msg"]
            if error["type"] == "extra_forbidden":
                message = "unknown field"
            secret = any(str(part) in _SECRET_FIELDS for part in error["loc"])
            if not secret and error["type"] not in ("missing", "extra_forbidden"):
                shown = redact_secrets(repr(error.get("input")))
                message += f" (got {shown[:80]})"
            if i in env:
                message += f" (from environment variable {env[i]})"
            lines.append(f"{where}: {message}")
        from_file = len(env) < len(lines)
        origin = f" in {os.fspath(source)}" if source is not None and from_file else ""
        # Keys are shown too, and a misplaced URL may be a key.
        return cls(redact_secrets(f"invalid configuration{origin}:\n  " + "\n  ".join(lines)))


class CircuitOpenError(GatewayBreakerError):
    """The service's breaker is open (or half-open with every probe slot taken)."""

    def __init__(self, service: str, retry_after: float) -> None:
        self.service = service
        self.retry_after = retry_after
        super().__init__(f"circuit breaker for {service!r} is open; retry after {retry_after:.1f}s")


class StoreError(GatewayBreakerError):
    """A state store operation failed (wraps the client's own error).

    `operation` names what failed (`write`, `load`, `probe`, ...), for metrics.
    """

    def __init__(self, message: str, operation: str = "store") -> None:
        super().__init__(message)
        self.operation = operation


class PolicyError(ConfigError):
    """A policy change was refused; `errors` lists `{"field", "message"}` for each problem."""

    def __init__(self, message: str, errors: list[dict[str, str]]) -> None:
        super().__init__(message)
        self.errors = errors
