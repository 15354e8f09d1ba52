"""Redis state store: one pool per process, versioned compare-and-set writes in Lua, pub/sub.

Times cross the wire on Redis's clock. Each round trip that reads state also reads Redis `TIME`,
so the store knows how far this host's clock is from Redis's and translates both ways: an open
period ends at the same moment on every instance, whatever the skew between their hosts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, replace
from importlib.resources import files
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

try:  # redis-py >= 7
    from redis.maint_notifications import MaintNotificationsConfig
except ImportError:  # pragma: no cover - older redis-py
    MaintNotificationsConfig = None  # type: ignore[assignment,misc]

from gateway_breaker.breaker import BreakerSnapshot, Clock
from gateway_breaker.config import RedisSettings, redact_url, url_secrets
from gateway_breaker.errors import ConfigError, StoreError, redact_secrets
from gateway_breaker.store.base import Evidence, EvidenceResult, WriteResult
from gateway_breaker.store.codec import (
    MAX_REASON_CHARS,
    MAX_STATE_BYTES,
    decode_state,
    encode_state,
)
from gateway_breaker.views import InstanceView, TransitionEvent

logger = logging.getLogger("gateway_breaker")
T = TypeVar("T")

HISTORY_MAX_LEN = 1000  # entries kept per service's history stream (approximately)
MAX_POLICY_BYTES = 8192
MAX_INSTANCE_BYTES = 1 << 20


def _script(name: str) -> str:
    return files("gateway_breaker").joinpath(f"resources/{name}.lua").read_text()


# An announcement is a stored state plus a short envelope: anything longer is not one.
MAX_EVENT_BYTES = MAX_STATE_BYTES + 512
MAX_EVENT_BRACKETS = 64  # objects and arrays in one announcement (a real one has a few)
WRITE_STATE_LUA = _script("write_state")
ACQUIRE_PROBE_LUA = _script("acquire_probe")
COUNT_EVIDENCE_LUA = _script("count_evidence")
_EVIDENCE_OUTCOMES = {0: "stale", 1: "opened", 2: "local", 3: "counted"}


class RedisStateStore:
    """Breaker state in Redis under `{key_prefix}:{service}:state`, one JSON value per service.

    Nothing here runs on a steady request path: the manager's background sync calls it, and a
    half-open probe lease is one bounded round trip. Every call is bounded by the configured
    socket timeout and raises `StoreError` on any Redis failure.
    """

    def __init__(self, settings: RedisSettings, *, clock: Clock = time.time) -> None:
        if settings.url is None:
            raise ConfigError("redis.url: a Redis URL is needed (set REDIS_URL)")
        self.topology = RedisTopology.parse(settings.url)
        self.settings = settings
        self.channel = f"{settings.key_prefix}:events"
        self._clock = clock
        self._client: Redis | RedisCluster | None = None
        self._scripts: dict[str, AsyncScript] = {}
        # service -> (last stored value, its decoding): re-reads skip unchanged values, and an
        # unusable value is logged once.
        self._decoded: dict[str, tuple[bytes | str, BreakerSnapshot | None]] = {}
        self.offset = 0.0  # Redis clock minus ours, in seconds
        self._services: set[str] = set()  # services loaded or written: the ones we use
        self._master: Any = None  # with Sentinel: the master's address we last wrote to
        self._master_moved = False  # the events subscription must follow it
        # Services whose absence says nothing (a failover or a restart may have lost them).
        self._unsure: set[str] = set()
        self.dropped_events: dict[str, int] = {}  # announcements dropped, by kind
        self.instance = uuid.uuid4().hex  # tags our announcements, so we skip our own

    def describe(self) -> str:
        return redact_url(self.settings.url or "")

    def _redis(self) -> Redis | RedisCluster:
        # The pool binds to the running event loop, so it is made on first use, not in __init__.
        if self._client is None:
            self._client = self.topology.client(self.settings)
            self._scripts = {
                "write": self._client.register_script(WRITE_STATE_LUA),
                "probe": self._client.register_script(ACQUIRE_PROBE_LUA),
                "evidence": self._client.register_script(COUNT_EVIDENCE_LUA),
            }
        return self._client

    async def _run(
        self, what: str, call: Awaitable[T], limit: float | None = None, operation: str = ""
    ) -> T:
        bound = limit if limit is not None else self.settings.socket_timeout_seconds * 2
        try:
            async with asyncio.timeout(bound):
                return await call
        except (RedisError, OSError, TimeoutError) as exc:
            text = _safe(exc, self.settings.url, self.settings.sentinel_password)
            raise StoreError(
                f"{what}: {type(exc).__name__}: {text}", operation or what.lower()
            ) from exc

    def key(self, service: str, kind: str = "state") -> str:
        """The Redis key of a service's `state` (or `probe` slots)."""
        if self.topology.kind == "cluster":
            # A service's keys share a hash slot, so one script may touch them all.
            return f"{self.settings.key_prefix}:{{{service}}}:{kind}"
        return f"{self.settings.key_prefix}:{service}:{kind}"

    # -- the StateStore protocol -----------------------------------------------------------

    async def connect(self) -> None:
        # The scripts are loaded now, so that no request's probe lease pays for NOSCRIPT.
        client = self._redis()
        if isinstance(client, RedisCluster):
            for source in (WRITE_STATE_LUA, ACQUIRE_PROBE_LUA, COUNT_EVIDENCE_LUA):
                await self._run("SCRIPT LOAD", client.script_load(source))
            await self.load([])
            return
        pipe = client.pipeline(transaction=False)
        pipe.script_load(WRITE_STATE_LUA)
        pipe.script_load(ACQUIRE_PROBE_LUA)
        pipe.script_load(COUNT_EVIDENCE_LUA)
        pipe.time()
        sent = self._clock()
        replies = await self._run("SCRIPT LOAD/TIME", pipe.execute(), operation="connect")
        self._observe_clock(sent, replies[-1])

    async def load(self, services: Sequence[str]) -> dict[str, BreakerSnapshot]:
        client = self._redis()
        self._services.update(services)
        await self._follow_master()
        keys = [self.key(s) for s in services]
        sent = self._clock()
        if isinstance(client, RedisCluster):
            # Keys spread over slots: the client splits the MGET by node.
            now = await self._run("TIME", client.time(target_nodes=RedisCluster.DEFAULT_NODE))
            values = await self._run("MGET", client.mget_nonatomic(keys)) if keys else []
        else:
            pipe = client.pipeline(transaction=False)
            pipe.time()
            if keys:
                pipe.mget(keys)
            replies = await self._run("TIME/MGET", pipe.execute(), operation="load")
            now, values = replies[0], (replies[1] if keys else [])
        self._observe_clock(sent, now)
        found: dict[str, BreakerSnapshot] = {}
        for service, raw in zip(services, values, strict=True):
            if raw is None:
                self._decoded.pop(service, None)
                continue
            self._unsure.discard(service)
            if (snapshot := self._decode(service, raw)) is not None:
                found[service] = snapshot
        return found

    def _observe_clock(self, sent: float, redis_time: tuple[int, int]) -> None:
        # Redis read its clock about halfway through the round trip.
        seconds, micros = redis_time
        offset = seconds + micros / 1e6 - (sent + self._clock()) / 2
        # Below a millisecond the difference is measurement noise: keep times as they are.
        self.offset = offset if abs(offset) >= 0.001 else 0.0

    def absence_means_reset(self, service: str) -> bool:
        cached = self._decoded.get(service)
        unusable = cached is not None and cached[1] is None
        return not unusable and service not in self._unsure

    async def write(
        self, service: str, snapshot: BreakerSnapshot, history: Sequence[TransitionEvent] = ()
    ) -> WriteResult:
        self._redis()
        await self._follow_master()  # a transition goes to the master the sentinels name now
        fleet = _shift(snapshot, self.offset)
        args: list[str | int | float] = [
            snapshot.version,
            encode_state(fleet),
            self.settings.state_ttl_seconds,
            self.channel,
            service,
            snapshot.state.value,
            self.instance,
            "",  # the SHA1 of a stored value our codec rejects, once one is seen (below)
            HISTORY_MAX_LEN,
            len(history),
        ]
        for event in history:
            rate = event.failure_rate
            args += [
                round((event.at + self.offset) * 1000),
                event.from_state,
                event.to_state,
                event.cause,
                event.origin,
                event.instance,
                event.failure_count,
                "" if rate is None else f"{rate:.4f}",
                (event.reason or "")[:MAX_REASON_CHARS],
            ]
        keys = [self.key(service), self.key(service, "probe"), self.key(service, "history")]
        for _ in range(3):
            call = self._scripts["write"](keys=keys, args=args)
            reply = await self._run("EVALSHA", call, operation="write")
            accepted, raw = int(reply[0]), reply[1]
            stored = self._decode(service, raw)
            self._unsure.discard(service)
            if accepted or stored is not None:
                break
            # The script kept a value our codec rejects: name it, so that it is overwritten.
            raw_bytes = raw if isinstance(raw, bytes) else str(raw).encode()
            args[7] = hashlib.sha1(raw_bytes, usedforsecurity=False).hexdigest()
        return WriteResult(accepted=bool(accepted), stored=stored)

    async def acquire_probe(
        self, service: str, token: str, slots: int, lease_seconds: float, limit: float
    ) -> float:
        """Take a fleet-wide probe slot: 0.0 when taken, else seconds until one may free up."""
        self._redis()
        args: list[str | int] = [token, slots, max(1, round(lease_seconds * 1000))]
        call = self._scripts["probe"](keys=[self.key(service, "probe")], args=args)
        wait_ms = await self._run("EVALSHA", call, limit, operation="probe")
        return int(wait_ms) / 1000

    async def release_probe(self, service: str, token: str) -> None:
        try:
            await self._run("ZREM", self._redis().zrem(self.key(service, "probe"), token))
        except StoreError as exc:
            if not _wrong_type(exc):
                raise
            # A foreign value replaced the slots: nothing of ours to give back; the next
            # acquire replaces it. One service's key, not an outage.

    async def report_evidence(self, service: str, evidence: Evidence) -> EvidenceResult:
        """One script call: this instance's counts in, the fleet's decision out."""
        self._redis()
        e = evidence
        args: list[str | int | float] = [
            e.instance,
            e.run,
            e.calls,
            e.failures,
            max(1, round(e.window_seconds * 1000)),
            e.failure_threshold,
            e.min_calls,
            repr(float(e.error_rate_threshold)),
            e.quorum,
            e.version,
            self.settings.state_ttl_seconds,
            self.channel,
            service,
            self.instance,
            HISTORY_MAX_LEN,
        ]
        keys = [
            self.key(service),
            self.key(service, "probe"),
            self.key(service, "history"),
            self.key(service, "evidence"),
        ]
        call = self._scripts["evidence"](keys=keys, args=args)
        reply = await self._run("EVALSHA", call, operation="evidence")
        code, text = int(reply[0]), reply[1]
        outcome = _EVIDENCE_OUTCOMES.get(code)
        if outcome is None:
            raise StoreError(f"evidence: unexpected reply code {code}", "evidence")
        stored = self._decode(service, text) if code in (0, 1) else None
        cause = (text.decode() if isinstance(text, bytes) else str(text)) if code == 2 else None
        return EvidenceResult(
            outcome=outcome,
            stored=stored,
            cause=cause,
            fleet_run=int(reply[2]),
            fleet_calls=int(reply[3]),
            fleet_failures=int(reply[4]),
            failing_instances=int(reply[5]),
        )

    async def live_instances(self, ttl: float) -> int:
        index = f"{self.settings.key_prefix}:instances"
        since = round((self._clock() + self.offset - ttl) * 1000)
        count: Any = await self._run(
            "ZCOUNT", self._redis().zcount(index, since, "+inf"), operation="fleet"
        )
        return int(count)

    async def history(self, service: str, limit: int) -> list[TransitionEvent]:
        key = self.key(service, "history")
        entries: Any = await self._run(
            "XREVRANGE", self._redis().xrevrange(key, count=limit), operation="history"
        )
        events = []
        for _, fields in entries or []:
            event = _history_event(service, fields or {}, -self.offset)
            if event is not None:
                events.append(event)
        return events

    async def load_policies(self, services: Sequence[str]) -> dict[str, dict[str, object]]:
        if not services:
            return {}
        client = self._redis()
        keys = [self.key(s, "policy") for s in services]
        if isinstance(client, RedisCluster):
            values = await self._run("MGET", client.mget_nonatomic(keys), operation="policy")
        else:
            values = await self._run("MGET", client.mget(keys), operation="policy")
        found: dict[str, dict[str, object]] = {}
        for service, raw in zip(services, values, strict=True):
            if raw is None:
                continue
            try:
                if len(raw) > MAX_POLICY_BYTES:
                    raise ValueError(f"{len(raw)} bytes, more than {MAX_POLICY_BYTES}")
                doc = json.loads(raw)
                if not isinstance(doc, dict):
                    raise ValueError("not a JSON object")
            except (ValueError, RecursionError) as exc:
                logger.warning(
                    "Ignoring unusable policy override (service=%s, error=%s)", service, exc
                )
                continue
            found[service] = doc
        return found

    async def write_policy(
        self, service: str, fields: dict[str, object] | None, instance: str
    ) -> None:
        client = self._redis()
        key = self.key(service, "policy")
        notice = json.dumps({"origin": instance, "kind": "policy", "service": service})
        if fields is None:
            await self._run("DEL", client.delete(key), operation="policy")
        else:
            await self._run("SET", client.set(key, json.dumps(fields)), operation="policy")
        await self._run("PUBLISH", client.publish(self.channel, notice), operation="policy")

    async def register(self, instance: InstanceView, ttl: float) -> None:
        client = self._redis()
        doc = instance.to_dict()
        doc["last_seen"] = round(doc["last_seen"] + self.offset, 3)
        doc["started_at"] = round(doc["started_at"] + self.offset, 3)
        key = f"{self.settings.key_prefix}:instance:{instance.id}"
        index = f"{self.settings.key_prefix}:instances"
        now_ms = round(doc["last_seen"] * 1000)
        pipe = client.pipeline(transaction=False)
        pipe.set(key, json.dumps(doc, separators=(",", ":")), px=max(1, round(ttl * 1000)))
        pipe.zadd(index, {instance.id: now_ms})
        pipe.zremrangebyscore(index, "-inf", now_ms - round(ttl * 1000) * 10)
        await self._run("SET/ZADD", pipe.execute(), operation="register")

    async def instances(self) -> list[InstanceView]:
        client = self._redis()
        index = f"{self.settings.key_prefix}:instances"
        ids: Any = await self._run("ZRANGE", client.zrange(index, 0, 999), operation="fleet")
        if not ids:
            return []
        keys = [f"{self.settings.key_prefix}:instance:{bytes(i).decode()}" for i in ids]
        if isinstance(client, RedisCluster):
            values = await self._run("MGET", client.mget_nonatomic(keys), operation="fleet")
        else:
            values = await self._run("MGET", client.mget(keys), operation="fleet")
        found = []
        for raw in values:
            view = None if raw is None else _instance_view(raw, -self.offset)
            if view is not None:
                found.append(view)
        return sorted(found, key=lambda v: v.started_at)

    async def events(self) -> AsyncIterator[tuple[str, BreakerSnapshot | None] | None]:
        """Stored states as instances write them; None once subscribed. Raises StoreError
        when cut off: pub/sub drops what is published meanwhile, so re-read after that."""
        pubsub = self._redis().pubsub()
        try:
            await self._run("SUBSCRIBE", pubsub.subscribe(self.channel))
            yield None
            while True:
                if self._master_moved:
                    # Announcements now go through the new master: subscribe there, re-read.
                    self._master_moved = False
                    raise StoreError("pub/sub: the Redis master changed")
                try:
                    message = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=self._listen_timeout
                    )
                except (RedisError, OSError) as exc:
                    # Redis may have restarted empty: a value missing now is no deletion.
                    self._unsure = set(self._services)
                    raise StoreError(f"pub/sub: {type(exc).__name__}") from exc
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    # redis-py's read can swallow a cancellation: honour it here.
                    raise asyncio.CancelledError
                if message is None or message.get("type") != "message":
                    continue
                event = self._decode_event(message["data"])
                announced = None if event is None else event[1]
                if event is not None and announced is None:
                    yield event  # a policy notice: the sync re-reads the policy key itself
                elif event is not None and announced is not None:
                    verified = await self._verify(event[0], announced)
                    if verified is not None:
                        yield verified
                else:
                    await asyncio.sleep(0)  # a flood of junk must not starve the requests
        finally:
            with contextlib.suppress(RedisError, OSError, RuntimeError):
                await pubsub.aclose()

    @property
    def _listen_timeout(self) -> float:
        # With Sentinel the listener looks up often enough to follow a new master at once.
        return 0.25 if self.topology.kind == "sentinel" else 5.0

    async def _follow_master(self) -> None:
        """With Sentinel: ask which server is the master now, and move there if it changed.

        A manual failover leaves the old master up (and writable) for a while; writes that
        went there would be lost when it is demoted. One round trip to a sentinel, made only
        by the background tasks; a sentinel that does not answer changes nothing.
        """
        client = self._client
        if self.topology.kind != "sentinel" or not isinstance(client, Redis):
            return
        pool = client.connection_pool
        if not isinstance(pool, SentinelConnectionPool):
            return
        try:
            async with asyncio.timeout(self.settings.socket_timeout_seconds):
                # Also drops the idle pooled connections to the old master.
                address = await pool.get_master_address()  # type: ignore[no-untyped-call]
        except (RedisError, OSError, TimeoutError) as exc:
            logger.debug("Sentinel did not name the master: %s", type(exc).__name__)
            return
        if self._master is not None and address != self._master:
            logger.warning(
                "Redis master changed (service=%s, from=%s:%s, to=%s:%s); following it",
                self.topology.service_name,
                *self._master,
                *address,
            )
            self._master_moved = True
            self._unsure = set(self._services)
        self._master = address

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if isinstance(client, RedisCluster):
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()
        elif client is not None:
            with contextlib.suppress(RedisError, OSError):
                await client.aclose(close_connection_pool=True)

    # -- decoding --------------------------------------------------------------------------

    def _decode_event(self, data: Any) -> tuple[str, BreakerSnapshot | None] | None:
        """An announcement, or None: ours, or dropped (and counted) as hostile or broken."""
        if not isinstance(data, bytes | str) or len(data) > MAX_EVENT_BYTES:
            self._drop("oversized", f"more than {MAX_EVENT_BYTES} bytes")
            return None
        raw = data.encode() if isinstance(data, str) else data
        if raw.count(b"{") + raw.count(b"[") > MAX_EVENT_BRACKETS:
            # Deep nesting costs a recursive parser dearly: refused before parsing.
            self._drop("malformed", "nested too deeply")
            return None
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # RecursionError: deeply nested
            self._drop("malformed", f"not JSON: {type(exc).__name__}")
            return None
        # A live policy change carries no state: a hint to re-read the service's policy key.
        # So does the fleet's first failures (`evidence`): a hint to send this instance's counts.
        policy = isinstance(doc, dict) and doc.get("kind") in ("policy", "evidence")
        if not isinstance(doc, dict) or not (policy or isinstance(doc.get("state"), dict)):
            self._drop("malformed", "not an announcement object")
            return None
        service = doc.get("service")
        if doc.get("origin") == self.instance:
            return None
        if not isinstance(service, str) or service not in self._services:
            # Never decoded or cached: a flood of invented names must not grow memory.
            self._drop("unknown_service", "a service this instance does not use")
            return None
        if policy:
            return service, None
        try:
            snapshot = decode_state(json.dumps(doc["state"]))
        except (ValueError, RecursionError) as exc:
            self._drop("invalid_state", str(exc)[:120])
            return None
        return service, snapshot  # on Redis's clock: shifted once verified

    async def _verify(
        self, service: str, announced: BreakerSnapshot
    ) -> tuple[str, BreakerSnapshot] | None:
        """The announced state if the store holds it (or a newer one); forgeries are dropped.

        An announcement is a hint; the stored value is the fleet's state. One GET, in the
        listener, for a state newer than the last one this store read.
        """
        cached = self._decoded.get(service)
        known = cached[1].version if cached is not None and cached[1] is not None else -1
        if 0 <= known - announced.version <= 2**52:
            return None  # nothing new (the sync ignores older versions anyway)
        raw = await self._run("GET", self._redis().get(self.key(service)))
        stored = None if raw is None else self._decode(service, raw)
        # Both on our clock with the same offset (a re-read may have moved it meanwhile).
        announced = _shift(announced, -self.offset)
        if stored is not None and (
            stored == announced
            or stored.version > announced.version
            or announced.version - stored.version > 2**52  # the version started again at 1
        ):
            return service, stored
        self._drop(
            "forged", "the announced state is not the stored one (forged, or lost in a failover)"
        )
        return None

    def _drop(self, kind: str, why: str) -> None:
        count = self.dropped_events.get(kind, 0)
        self.dropped_events[kind] = count + 1
        if not count:
            # Another instance's service is no sign of trouble; the other kinds are.
            level = logging.DEBUG if kind == "unknown_service" else logging.WARNING
            logger.log(
                level,
                "Dropped a circuit breaker event from Redis (kind=%s, error=%s); further ones"
                " of this kind are counted, not logged",
                kind,
                why,
            )

    def _decode(self, service: str, raw: bytes | str) -> BreakerSnapshot | None:
        cached = self._decoded.get(service)
        if cached is not None and cached[0] == raw:
            snapshot = cached[1]  # unchanged since the last read: no decoding, nothing to log
        else:
            try:
                snapshot = decode_state(raw)
            except ValueError as exc:
                snapshot = None
                logger.warning(
                    "Ignoring unusable circuit breaker state in Redis (service=%s, error=%s)",
                    service,
                    exc,
                )
            self._decoded[service] = (raw, snapshot)
        return None if snapshot is None else _shift(snapshot, -self.offset)


@dataclass(frozen=True)
class RedisTopology:
    """What a Redis URL names: one server, a Sentinel-watched master, or a Cluster.

    `redis://`, `rediss://` and `unix://` are read by redis-py itself. The others, as the
    `limits` library writes them, are parsed here (redis-py's `from_url` does not know them):
    `redis+sentinel://[user:pass@]h1:p1[,h2:p2]/service_name[/db]` and
    `redis+cluster://[user:pass@]h1:p1[,h2:p2]`. The URL's credentials are the data nodes';
    sentinels get `redis.sentinel_password`.
    """

    kind: str  # "single", "sentinel" or "cluster"
    url: str
    hosts: tuple[tuple[str, int], ...] = ()
    service_name: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> RedisTopology:
        parts = urlsplit(url)
        if parts.scheme in ("redis", "rediss", "unix"):
            return cls("single", url)
        kind = {"redis+sentinel": "sentinel", "redis+cluster": "cluster"}.get(parts.scheme)
        if kind is None:
            raise ConfigError(f"redis.url: unsupported scheme {parts.scheme}://")
        userinfo, _, hostlist = parts.netloc.rpartition("@")
        user, _, password = userinfo.partition(":")
        hosts = []
        for item in hostlist.split(","):
            host, _, port = item.rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError(f"redis.url: {parts.scheme}:// needs host:port pairs")
            hosts.append((host.strip("[]"), int(port)))
        path = [p for p in parts.path.split("/") if p]
        if kind == "sentinel" and not path:
            raise ConfigError("redis.url: redis+sentinel:// needs the master's service name")
        if kind == "cluster" and path:
            raise ConfigError("redis.url: redis+cluster:// takes no path (a cluster has db 0)")
        if len(path) > 1 and not path[1].isdigit():
            raise ConfigError("redis.url: the database after the service name is a number")
        return cls(
            kind,
            url,
            tuple(hosts),
            service_name=path[0] if path else "",
            db=int(path[1]) if len(path) > 1 else 0,
            username=unquote(user) or None,
            password=unquote(password) or None,
        )

    def client(self, s: RedisSettings) -> Redis | RedisCluster:
        """A client with one connection pool of `s.pool_size`, explicit timeouts, no retries."""
        common: dict[str, Any] = {
            "socket_timeout": s.socket_timeout_seconds,
            "socket_connect_timeout": s.connect_timeout_seconds,
            # One immediate retry, on a broken connection only: a pooled connection that died
            # with a restarted server fails once. Writes are compare-and-set, so a retry is safe;
            # longer outages are the sync loop's, with its own backoff.
            "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            "client_name": "gateway-breaker",
        }
        if MaintNotificationsConfig is not None:
            # Off: Redis 7 does not know it, and "auto" also skips the stale-connection check.
            common["maint_notifications_config"] = MaintNotificationsConfig(enabled=False)
        tls = {"ssl_ca_certs": s.ssl_ca_certs, "ssl_certfile": s.ssl_certfile}
        tls |= {"ssl_keyfile": s.ssl_keyfile}
        tls = {k: v for k, v in tls.items() if v is not None}
        auth: dict[str, Any] = {"username": self.username, "password": self.password}
        if self.kind == "cluster":
            return RedisCluster(
                startup_nodes=[ClusterNode(h, p) for h, p in self.hosts],
                max_connections=s.pool_size,
                **auth,
                **common,
            )
        if self.kind == "sentinel":
            sentinel_timeouts = {k: common[k] for k in ("socket_timeout", "socket_connect_timeout")}
            sentinel = Sentinel(
                list(self.hosts),
                sentinel_kwargs={"password": s.sentinel_password, **sentinel_timeouts},
                **common,
            )
            master: Redis = sentinel.master_for(
                self.service_name, max_connections=s.pool_size, db=self.db, **auth
            )
            return master
        if urlsplit(self.url).scheme == "rediss":
            common |= tls
        pool = BlockingConnectionPool.from_url(
            self.url,
            max_connections=s.pool_size,
            timeout=s.socket_timeout_seconds,  # wait for a free pooled connection
            health_check_interval=30,
            **common,
        )
        return Redis.from_pool(pool)


def _shift(snapshot: BreakerSnapshot, seconds: float) -> BreakerSnapshot:
    """The snapshot with its times moved to another clock."""
    if not seconds:
        return snapshot

    def moved(t: float | None) -> float | None:
        return None if t is None else t + seconds

    manual = snapshot.manual
    if manual is not None:
        manual = replace(manual, until=moved(manual.until), since=moved(manual.since))
    return replace(
        snapshot,
        opened_at=moved(snapshot.opened_at),
        last_failure_time=moved(snapshot.last_failure_time),
        manual=manual,
        closed_at=moved(snapshot.closed_at),
    )


def _history_event(service: str, fields: Any, shift: float) -> TransitionEvent | None:
    """One history stream entry; None when it is not one the package wrote."""
    try:
        get = {k.decode(): v.decode() for k, v in fields.items()}
        rate = get.get("failure_rate") or ""
        return TransitionEvent(
            service=service,
            at=int(get["at"]) / 1000 + shift,
            from_state=get["from"][:20],
            to_state=get["to"][:20],
            cause=get["cause"][:40],
            origin=get["origin"][:20],
            instance=get["instance"][:64],
            version=int(get["version"]),
            failure_count=int(get["failure_count"]),
            failure_rate=float(rate) if rate else None,
            reason=get.get("reason") or None,
        )
    except (KeyError, ValueError, UnicodeDecodeError):
        return None


def _instance_view(raw: bytes, shift: float) -> InstanceView | None:
    try:
        if len(raw) > MAX_INSTANCE_BYTES:
            return None
        doc = json.loads(raw)
        breakers = {
            str(name): (str(entry["state"]), int(entry["version"]))
            for name, entry in doc.get("breakers", {}).items()
        }
        return InstanceView(
            id=str(doc["id"]),
            host=str(doc["host"]),
            pid=int(doc["pid"]),
            started_at=float(doc["started_at"]) + shift,
            last_seen=float(doc["last_seen"]) + shift,
            version=str(doc["version"]),
            breakers=breakers,
        )
    except (KeyError, ValueError, TypeError, AttributeError, RecursionError):
        return None


def _wrong_type(exc: StoreError) -> bool:
    return isinstance(exc.__cause__, ResponseError) and "WRONGTYPE" in str(exc.__cause__)


def _safe(exc: BaseException, url: str | None, *secrets: str | None) -> str:
    """The error text with every secret of the URL (and `secrets`) masked."""
    text = str(exc)
    for secret in url_secrets(url, *secrets):
        text = text.replace(secret, "***")
    return redact_secrets(text)
