"""Redis state store: one pool per process, versioned compare-and-set writes in Lua."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from importlib.resources import files
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from gateway_breaker.breaker import BreakerSnapshot
from gateway_breaker.config import RedisSettings, redact_url
from gateway_breaker.errors import ConfigError, StoreError
from gateway_breaker.store.base import WriteResult
from gateway_breaker.store.codec import decode_state, encode_state

logger = logging.getLogger("gateway_breaker")
WRITE_STATE_LUA = files("gateway_breaker").joinpath("resources/write_state.lua").read_text()


class RedisStateStore:
    """Breaker state in Redis under `{key_prefix}:{service}:state`, one JSON value per service.

    Nothing here runs on the request path: the manager's background sync calls it. Every call is
    bounded by the configured socket timeout and raises `StoreError` on any Redis failure.
    """

    def __init__(self, settings: RedisSettings) -> None:
        if settings.url is None:
            raise ConfigError("redis.url: a Redis URL is needed (set REDIS_URL)")
        scheme = urlsplit(settings.url).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ConfigError(f"redis.url: {scheme}:// URLs are not supported yet")
        self.settings = settings
        self._client: Redis | None = None
        self._write_script: AsyncScript | None = None
        self._bad: dict[str, str] = {}  # service -> last unusable value, so it is logged once

    def describe(self) -> str:
        return redact_url(self.settings.url or "")

    def _redis(self) -> Redis:
        # The pool binds to the running event loop, so it is made on first use, not in __init__.
        if self._client is None:
            s = self.settings
            kwargs: dict[str, Any] = {
                "max_connections": s.pool_size,
                "timeout": s.socket_timeout_seconds,  # wait for a free pooled connection
                "socket_timeout": s.socket_timeout_seconds,
                "socket_connect_timeout": s.connect_timeout_seconds,
                # The sync loop retries with its own backoff; a command fails fast here.
                "retry": Retry(NoBackoff(), 0),
                "health_check_interval": 30,
                "client_name": "gateway-breaker",
            }
            if urlsplit(s.url or "").scheme == "rediss":
                kwargs |= {
                    k: v
                    for k, v in {
                        "ssl_ca_certs": s.ssl_ca_certs,
                        "ssl_certfile": s.ssl_certfile,
                        "ssl_keyfile": s.ssl_keyfile,
                    }.items()
                    if v is not None
                }
            pool = BlockingConnectionPool.from_url(s.url or "", **kwargs)
            self._client = Redis.from_pool(pool)
        return self._client

    async def _run(self, what: str, coro: Any) -> Any:
        try:
            async with asyncio.timeout(self.settings.socket_timeout_seconds * 2):
                return await coro
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreError(
                f"{what}: {type(exc).__name__}: {_safe(exc, self.settings.url)}"
            ) from exc

    async def connect(self) -> None:
        client = self._redis()
        await self._run("PING", client.ping())

    async def load(self, services: Sequence[str]) -> dict[str, BreakerSnapshot]:
        if not services:
            return {}
        keys = [self.settings.state_key(s) for s in services]
        values = await self._run("MGET", self._redis().mget(keys))
        found: dict[str, BreakerSnapshot] = {}
        for service, raw in zip(services, values, strict=True):
            if raw is None:
                continue
            snapshot = self._decode(service, raw)
            if snapshot is not None:
                found[service] = snapshot
        return found

    async def write(self, service: str, snapshot: BreakerSnapshot) -> WriteResult:
        if self._write_script is None:
            # register_script re-loads the script when a restarted Redis has forgotten it.
            self._write_script = self._redis().register_script(WRITE_STATE_LUA)
        args: list[str | int] = [
            snapshot.version,
            encode_state(snapshot),
            self.settings.state_ttl_seconds,
        ]
        reply = await self._run(
            "EVALSHA", self._write_script(keys=[self.settings.state_key(service)], args=args)
        )
        accepted, raw = int(reply[0]), reply[1]
        return WriteResult(accepted=bool(accepted), stored=self._decode(service, raw))

    def _decode(self, service: str, raw: bytes) -> BreakerSnapshot | None:
        try:
            snapshot = decode_state(raw)
        except ValueError as exc:
            text = repr(raw[:64])
            if self._bad.get(service) != text:
                self._bad[service] = text
                logger.warning(
                    "Ignoring unusable circuit breaker state in Redis (service=%s, error=%s)",
                    service,
                    exc,
                )
            return None
        self._bad.pop(service, None)
        return snapshot

    async def aclose(self) -> None:
        client, self._client = self._client, None
        self._write_script = None
        if client is not None:
            with contextlib.suppress(RedisError, OSError):
                await client.aclose(close_connection_pool=True)


def _safe(exc: BaseException, url: str | None) -> str:
    """The error text with any password of the URL masked."""
    text = str(exc)
    if url:
        password = urlsplit(url).password
        if password:
            text = text.replace(password, "***")
    return text
