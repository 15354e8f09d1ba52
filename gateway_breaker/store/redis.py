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
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import replace
from importlib.resources import files
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.commands.core import AsyncScript
from redis.exceptions import AskError, MovedError, RedisError, ResponseError

try:  # redis-py >= 7
    from redis.maint_notifications import MaintNotificationsConfig
except ImportError:  # pragma: no cover - older redis-py
    MaintNotificationsConfig = None  # type: ignore[assignment,misc]

from gateway_breaker.breaker import BreakerSnapshot, Clock
from gateway_breaker.config import RedisSettings, redact_url, url_secrets
from gateway_breaker.errors import ConfigError, PolicyError, StoreError, redact_secrets
from gateway_breaker.store import checks
from gateway_breaker.store.base import Evidence, EvidenceResult, Invalidated, WriteResult
from gateway_breaker.store.cluster_nodes import INVALIDATE_CHANNEL, ClusterNodes, NodeLost
from gateway_breaker.store.codec import (
    MAX_REASON_CHARS,
    MAX_STATE_BYTES,
    decode_state,
    encode_state,
    state_from_doc,
)
from gateway_breaker.store.topology import RedisTopology, dedicated
from gateway_breaker.views import InstanceView, TransitionEvent

logger = logging.getLogger("gateway_breaker")
T = TypeVar("T")

HISTORY_MAX_LEN = 1000  # entries kept per service's history stream (approximately)


def _script(name: str) -> str:
    return files("gateway_breaker").joinpath(f"resources/{name}.lua").read_text()


# An announcement is a stored state plus a short envelope: anything longer is not one.
MAX_EVENT_BYTES = MAX_STATE_BYTES + 512
MAX_EVENT_BRACKETS = 64  # objects and arrays in one announcement (a real one has a few)
WRITE_STATE_LUA = _script("write_state")
ACQUIRE_PROBE_LUA = _script("acquire_probe")
COUNT_EVIDENCE_LUA = _script("count_evidence")
READ_HISTORY_LUA = _script("read_history")
_EVIDENCE_OUTCOMES = {0: "stale", 1: "opened", 2: "local", 3: "counted"}
# Keys read by one MGET at most: a restore of 10,000 states is 10 round trips, and Redis serves
# other clients (a transition's announcement) between them.
MGET_CHUNK = 1000
# Announcements verified together at most (a burst's; one MGET of their keys).
VERIFY_BATCH = 256
# An invalidated state key waits this long for the announcement that usually follows it.
STALE_GRACE_SECONDS = 0.05
# Re-reads on the tracked connection measure Redis's clock at most this often.
CLOCK_READ_SECONDS = 10.0


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
        self.rejected = checks.Rejections()  # unusable values of our other keys, by kind
        self._policies: dict[str, dict[str, object]] = {}  # the last usable override read
        self.instance = uuid.uuid4().hex  # tags our announcements, so we skip our own
        # Server-assisted client-side caching: the one connection that reads state and policy
        # keys, tracked by Redis, which sends their invalidations to the subscriber connection.
        self._tracked: Redis | None = None
        self._retired: list[Redis] = []  # tracked connections given up, not closed yet
        # On a Cluster: a tracked reader and an invalidation subscriber per node.
        self._nodes: ClusterNodes | None = None
        self._nodes_tracked = False
        self._nodes_opened = False  # once opened, a new opening reads the slot map again
        self._retired_nodes: list[ClusterNodes] = []
        self._tracking_broken = False  # either connection was re-made: Redis forgot it
        self.tracking_refused = False  # CLIENT TRACKING not allowed here: re-reads only
        self._stale: dict[str, float] = {}  # state keys invalidated, not read since: when
        self._pushed: list[Invalidated] = []  # RESP3 invalidation pushes not yet yielded
        self._clock_read = -CLOCK_READ_SECONDS  # when the offset was measured (monotonic)

    @property
    def tracking(self) -> bool:
        """Whether Redis reports changes of the keys this instance read (in every case but a
        Redis that refuses CLIENT TRACKING, while subscribed)."""
        return self._tracked is not None or (self._nodes is not None and self._nodes_tracked)

    @property
    def per_key_reads(self) -> bool:
        """Whether reading k keys costs k commands (a Cluster: each service has its own slot)."""
        return self.topology.kind == "cluster"

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
                "history": self._client.register_script(READ_HISTORY_LUA),
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

    async def _read(self, what: str, call: Awaitable[T], operation: str) -> T:
        """A read on the tracked connection. One that failed (a timeout may leave a reply in
        flight) ends tracking: reads go through the pool, the listener sets it up afresh."""
        try:
            return await self._run(what, call, operation=operation)
        except BaseException:
            self._retire_tracking()
            self._tracking_broken = True
            raise

    def _retire_tracking(self) -> None:
        """Stop reading on the tracked connection; it is closed once no read can be using it
        (at the next subscription, or at the end)."""
        tracked, self._tracked = self._tracked, None
        if tracked is not None:
            self._retired.append(tracked)
        nodes, self._nodes = self._nodes, None
        if nodes is not None:
            self._retired_nodes.append(nodes)

    async def _close_retired(self) -> None:
        nodes, self._retired_nodes = self._retired_nodes, []
        for each in nodes:
            await each.aclose(self.settings.socket_timeout_seconds)
        retired, self._retired = self._retired, []
        for tracked in retired:
            with contextlib.suppress(RedisError, OSError, RuntimeError, TimeoutError):
                async with asyncio.timeout(self.settings.socket_timeout_seconds):
                    await tracked.aclose(close_connection_pool=True)

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
            await self._run("CLUSTER NODES", self._open_nodes(client), operation="connect")
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
        if len(services) > MGET_CHUNK and self.topology.kind != "cluster":
            found: dict[str, BreakerSnapshot] = {}
            for i in range(0, len(services), MGET_CHUNK):
                found.update(await self.load(services[i : i + MGET_CHUNK]))
            return found
        client = self._redis()
        self._services.update(services)
        await self._follow_master()
        keys = [self.key(s) for s in services]
        sent = self._clock()
        if isinstance(client, RedisCluster):
            # Keys spread over slots: one pipeline a node, on the nodes' tracked readers.
            values = await self._cluster_get(client, keys, "load")
            if time.monotonic() - self._clock_read < CLOCK_READ_SECONDS:
                return self._found(services, values)
            sent = self._clock()
            now = await self._run("TIME", client.time(target_nodes=RedisCluster.DEFAULT_NODE))
        elif (tracked := self._tracked) is not None:
            # Read on the tracked connection: Redis then reports these keys' next change.
            values = await self._read("MGET", tracked.mget(keys), "load") if keys else []
            if time.monotonic() - self._clock_read < CLOCK_READ_SECONDS:
                return self._found(services, values)
            sent = self._clock()
            now = await self._read("TIME", tracked.time(), "load")
        else:
            pipe = client.pipeline(transaction=False)
            pipe.time()
            if keys:
                pipe.mget(keys)
            replies = await self._run("TIME/MGET", pipe.execute(), operation="load")
            now, values = replies[0], (replies[1] if keys else [])
        self._observe_clock(sent, now)
        self._clock_read = time.monotonic()
        return self._found(services, values)

    def _found(self, services: Sequence[str], values: Sequence[Any]) -> dict[str, BreakerSnapshot]:
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
            "",  # the SHA1 of a stored state our codec rejects, once one is seen (below)
        ]
        keys = [
            self.key(service),
            self.key(service, "probe"),
            self.key(service, "history"),
            self.key(service, "evidence"),
        ]
        for _ in range(3):
            call = self._scripts["evidence"](keys=keys, args=args)
            reply = await self._run("EVALSHA", call, operation="evidence")
            code, text = int(reply[0]), reply[1]
            stored = self._decode(service, text) if code in (0, 1) else None
            if code != 0 or stored is not None:
                break
            # As in write(): a value our codec rejects must not silence the fleet's counting.
            raw = text if isinstance(text, bytes) else str(text).encode()
            args[-1] = hashlib.sha1(raw, usedforsecurity=False).hexdigest()
        outcome = _EVIDENCE_OUTCOMES.get(code)
        if outcome is None:
            raise StoreError(f"evidence: unexpected reply code {code}", "evidence")
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
        try:
            count: Any = await self._run(
                "ZCOUNT", self._redis().zcount(index, since, "+inf"), operation="fleet"
            )
        except StoreError as exc:
            if not _wrong_type(exc):
                raise
            self.rejected("registry", "the instance index is not a sorted set")
            return 0  # unknown: the quorum stays the policy's; the next heartbeat repairs it
        return int(count)

    async def history(self, service: str, limit: int) -> list[TransitionEvent]:
        self._redis()
        key = self.key(service, "history")
        call = self._scripts["history"](keys=[key], args=[limit, checks.MAX_FIELD_BYTES])
        entries: Any = await self._run("EVALSHA", call, operation="history")
        events = []
        for entry in entries or []:
            try:
                flat = entry[1]
                fields = dict(zip(flat[::2], flat[1::2], strict=True))
                events.append(checks.history_event(service, fields, -self.offset))
            except (ValueError, TypeError, IndexError, UnicodeDecodeError) as exc:
                self.rejected("history", f"service={service}: {exc}")
        return events

    async def load_policies(self, services: Sequence[str]) -> dict[str, dict[str, object]]:
        if not services:
            return {}
        if len(services) > MGET_CHUNK and self.topology.kind != "cluster":
            chunks: dict[str, dict[str, object]] = {}
            for i in range(0, len(services), MGET_CHUNK):
                chunks.update(await self.load_policies(services[i : i + MGET_CHUNK]))
            return chunks
        client = self._redis()
        keys = [self.key(s, "policy") for s in services]
        if isinstance(client, RedisCluster):
            values = await self._cluster_get(client, keys, "policy")
        elif (tracked := self._tracked) is not None:
            values = await self._read("MGET", tracked.mget(keys), "policy")
        else:
            values = await self._run("MGET", client.mget(keys), operation="policy")
        return self._policies_found(services, values)

    def _policies_found(
        self, services: Sequence[str], values: Sequence[Any]
    ) -> dict[str, dict[str, object]]:
        found: dict[str, dict[str, object]] = {}
        for service, raw in zip(services, values, strict=True):
            if raw is None:
                continue
            try:
                doc = checks.decode_policy(raw)
            except ValueError as exc:
                self.rejected("policy", f"service={service}: {exc}")
                # Not a deletion: the last usable override stays in force.
                if service in self._policies:
                    found[service] = self._policies[service]
                continue
            found[service] = self._policies[service] = doc
        return found

    async def load_both(
        self, services: Sequence[str]
    ) -> tuple[dict[str, BreakerSnapshot], dict[str, dict[str, object]]]:
        """States and policy overrides of a few services (the slow re-read): one `MGET` of
        both on a tracked connection (one pipeline a node on a Cluster); when Redis's clock is
        due to be read, or with no tracking, as `load` and `load_policies` do."""
        client = self._redis()
        await self._follow_master()
        tracked = self._tracked
        due = time.monotonic() - self._clock_read >= CLOCK_READ_SECONDS
        if not services or due or len(services) > MGET_CHUNK // 2:
            return await self.load(services), await self.load_policies(services)
        keys = [self.key(s) for s in services] + [self.key(s, "policy") for s in services]
        if tracked is not None:
            values = await self._read("MGET", tracked.mget(keys), "load")
        elif isinstance(client, RedisCluster) and self._nodes is not None:
            values = await self._cluster_get(client, keys, "load")
        else:
            return await self.load(services), await self.load_policies(services)
        self._services.update(services)
        count = len(services)
        return self._found(services, values[:count]), self._policies_found(services, values[count:])

    async def write_policy(
        self, service: str, fields: dict[str, object] | None, instance: str
    ) -> None:
        client = self._redis()
        key = self.key(service, "policy")
        notice = json.dumps({"origin": instance, "kind": "policy", "service": service})
        if fields is None:
            await self._run("DEL", client.delete(key), operation="policy")
            self._policies.pop(service, None)
        else:
            try:
                text = checks.encode_policy(fields)
            except ValueError as exc:
                raise PolicyError(str(exc), [{"field": "body", "message": str(exc)}]) from None
            await self._run("SET", client.set(key, text), operation="policy")
            self._policies[service] = fields
        await self._run("PUBLISH", client.publish(self.channel, notice), operation="policy")

    async def register(self, instance: InstanceView, ttl: float) -> None:
        client = self._redis()
        doc = instance.to_dict()
        doc["last_seen"] = round(doc["last_seen"] + self.offset, 3)
        doc["started_at"] = round(doc["started_at"] + self.offset, 3)
        key = f"{self.settings.key_prefix}:instance:{instance.id}"
        index = f"{self.settings.key_prefix}:instances"
        now_ms = round(doc["last_seen"] * 1000)
        for attempt in range(2):
            pipe = client.pipeline(transaction=False)
            pipe.set(key, json.dumps(doc, separators=(",", ":")), px=max(1, round(ttl * 1000)))
            pipe.zadd(index, {instance.id: now_ms})
            pipe.zremrangebyscore(index, "-inf", now_ms - round(ttl * 1000) * 10)
            try:
                await self._run("SET/ZADD", pipe.execute(), operation="register")
                return
            except StoreError as exc:
                if attempt or not _wrong_type(exc):
                    raise
            # Not an index of ours: one key of one feature, replaced, never an outage.
            self.rejected("registry", "the instance index is not a sorted set: replaced")
            await self._run("DEL", client.delete(index), operation="register")

    async def heartbeat(self, instance: str, ttl: float) -> int | None:
        """Keep a registered instance live and count the live ones: three commands in one
        round trip, whatever its number of breakers. None: its record is gone (expired, or a
        new master lacks it): register it again."""
        client = self._redis()
        last_seen = self._clock() + self.offset
        index = f"{self.settings.key_prefix}:instances"
        pipe = client.pipeline(transaction=False)
        pipe.zadd(index, {instance: round(last_seen * 1000)})
        pipe.pexpire(f"{self.settings.key_prefix}:instance:{instance}", max(1, round(ttl * 1000)))
        pipe.zcount(index, round((last_seen - ttl) * 1000), "+inf")
        try:
            replies = await self._run("ZADD/PEXPIRE/ZCOUNT", pipe.execute(), operation="register")
        except StoreError as exc:
            if not _wrong_type(exc):
                raise
            return None  # not an index of ours: registering again replaces it
        return int(replies[2]) if replies[1] else None

    async def instances(self) -> list[InstanceView]:
        client = self._redis()
        index = f"{self.settings.key_prefix}:instances"
        try:
            ids: Any = await self._run(
                "ZRANGE", client.zrange(index, 0, 999, withscores=True), operation="fleet"
            )
        except StoreError as exc:
            if not _wrong_type(exc):
                raise
            self.rejected("registry", "the instance index is not a sorted set")
            return []
        ids = [(i, score) for i, score in ids or [] if len(i) <= 64 and math.isfinite(score)]
        if not ids:
            return []
        keys = [
            f"{self.settings.key_prefix}:instance:{bytes(i).decode(errors='replace')}"
            for i, _ in ids
        ]
        # The record is written when the view changes; the heartbeat moves only the score.
        seen = {bytes(i).decode(errors="replace"): score / 1000 - self.offset for i, score in ids}
        if isinstance(client, RedisCluster):
            values = await self._run("MGET", client.mget_nonatomic(keys), operation="fleet")
        else:
            values = await self._run("MGET", client.mget(keys), operation="fleet")
        found = []
        for raw in values:
            if raw is None:
                continue
            try:
                view = checks.instance_view(raw, -self.offset)
            except ValueError as exc:
                self.rejected("instance", str(exc))
                continue
            found.append(replace(view, last_seen=max(view.last_seen, seen.get(view.id, 0.0))))
        return sorted(found, key=lambda v: v.started_at)

    async def events(
        self,
    ) -> AsyncIterator[tuple[str, BreakerSnapshot | None] | Invalidated | None]:
        """Stored states as instances write them; None once subscribed. Raises StoreError
        when cut off: pub/sub drops what is published meanwhile, so re-read after that."""
        pubsub = self._redis().pubsub()
        try:
            await self._run("SUBSCRIBE", self._subscribe(pubsub))
            yield None
            while True:
                if self._master_moved:
                    # Announcements now go through the new master: subscribe there, re-read.
                    self._master_moved = False
                    raise StoreError("pub/sub: the Redis master changed")
                if self._tracking_broken:
                    # A connection was re-made: Redis tracks nothing for us any more.
                    raise StoreError("client tracking: a connection was re-made")
                if due := self._stale_due():
                    yield due
                try:
                    message = await pubsub.get_message(
                        ignore_subscribe_messages=True,
                        timeout=STALE_GRACE_SECONDS if self._stale else self._listen_timeout,
                    )
                except ResponseError as exc:
                    if self._tracked is None or self.tracking_refused:
                        raise StoreError(f"pub/sub: {type(exc).__name__}") from exc
                    # Most likely an ACL without the invalidation channel: subscribe again
                    # without tracking.
                    self._refuse_tracking(exc)
                    raise StoreError(f"pub/sub: {type(exc).__name__}") from exc
                except (RedisError, OSError) as exc:
                    # Redis may have restarted empty: a value missing now is no deletion.
                    self._unsure = set(self._services)
                    raise StoreError(f"pub/sub: {type(exc).__name__}") from exc
                while self._pushed:
                    if (now := self._hold(self._pushed.pop(0))) is not None:
                        yield now
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    # redis-py's read can swallow a cancellation: honour it here.
                    raise asyncio.CancelledError
                if message is None:
                    continue
                # A burst: what else has arrived is taken now, and the states it announces are
                # verified together, one read for them all.
                messages = [message]
                while len(messages) < VERIFY_BATCH:
                    more = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0)
                    if more is None:
                        break
                    messages.append(more)
                announced: dict[str, list[BreakerSnapshot]] = {}
                for message in messages:
                    if message.get("type") != "message":
                        continue
                    if _text(message.get("channel")) == INVALIDATE_CHANNEL:
                        if (now := self._hold(self._invalidated(message["data"]))) is not None:
                            yield now
                        continue
                    event = self._decode_event(message["data"])
                    if event is None:
                        await asyncio.sleep(0)  # a flood of junk must not starve the requests
                    elif event[1] is None:
                        yield event  # a policy notice: the sync re-reads the policy key itself
                    else:
                        announced.setdefault(event[0], []).append(event[1])
                if announced:
                    for verified in await self._verify(announced):
                        yield verified
        finally:
            self._retire_tracking()
            with contextlib.suppress(RedisError, OSError, RuntimeError):
                await pubsub.aclose()

    def _hold(self, event: Invalidated) -> Invalidated | None:
        """What to report of an invalidation now. A changed state key is held back briefly:
        a write through the package announces itself right after its invalidation, and the
        announcement's verifying read re-reads (and tracks) the key, so it needs no second."""
        if event.everything:
            self._stale.clear()
            return event
        now = time.monotonic()
        for service in event.states:
            self._stale.setdefault(service, now)
        return Invalidated(policies=event.policies) if event.policies else None

    def _stale_due(self) -> Invalidated | None:
        """State keys changed past the announcements: held for their grace, no read since."""
        if not self._stale:
            return None
        limit = time.monotonic() - STALE_GRACE_SECONDS
        due = tuple(s for s, at in self._stale.items() if at <= limit)
        for service in due:
            del self._stale[service]
        return Invalidated(states=due) if due else None

    async def _subscribe(self, pubsub: Any) -> None:
        """Subscribe to the announcements and, where Redis allows it, to the invalidations of
        the keys read on a tracked connection redirected to this one (Redis 6.2+, RESP2)."""
        self._tracking_broken = False
        self._stale.clear()  # everything is read again after a subscription
        await self._close_retired()
        client = self._redis()
        if isinstance(client, RedisCluster):
            await pubsub.subscribe(self.channel)
            await self._open_nodes(client)
            return
        if self.tracking_refused:
            await pubsub.subscribe(self.channel)
            return
        await pubsub.connect()
        connection = pubsub.connection
        await connection.send_command("CLIENT", "ID")
        subscriber_id = await connection.read_response()
        tracked = dedicated(client)
        try:
            if isinstance(subscriber_id, ResponseError):
                raise subscriber_id
            await tracked.initialize()
            await tracked.execute_command("CLIENT", "TRACKING", "on", "REDIRECT", subscriber_id)  # type: ignore[no-untyped-call]
        except ResponseError as exc:
            # An ACL without client|id or client|tracking, a server older than 6.2: re-reads.
            with contextlib.suppress(RedisError, OSError, RuntimeError):
                await tracked.aclose(close_connection_pool=True)
            self._refuse_tracking(exc)
            await pubsub.subscribe(self.channel)
            return
        except BaseException:
            self._retired.append(tracked)  # closed at the next subscription, or at the end
            raise
        # RESP2: invalidations arrive as messages on the channel; RESP3: as pushes.
        self._pushed.clear()
        connection._parser.set_invalidation_push_handler(self._invalidation_pushed)
        try:
            await pubsub.subscribe(self.channel, INVALIDATE_CHANNEL)
        except BaseException:
            self._retired.append(tracked)
            raise
        connection.register_connect_callback(self._connection_remade)
        if tracked.connection is not None:
            tracked.connection.register_connect_callback(self._connection_remade)  # type: ignore[no-untyped-call]
        self._tracked = tracked

    async def _open_nodes(self, client: RedisCluster) -> None:
        """On a Cluster: a reader per node, tracked by its node unless Redis refused tracking;
        the slot map read again (a failover or a resharding may have moved it)."""
        if self._nodes is not None:
            return
        track = not self.tracking_refused
        nodes = ClusterNodes(
            client,
            lambda host, port: self.topology.node_client(self.settings, host, port),
            self._node_invalidated,
            self._node_lost,
        )
        try:
            await nodes.open(track=track, refresh=self._nodes_opened)
        except ResponseError as exc:
            await nodes.aclose(self.settings.socket_timeout_seconds)
            if not track:
                raise
            # An ACL without client|id or client|tracking: batched reads, untracked.
            self._refuse_tracking(exc)
            return await self._open_nodes(client)
        except BaseException:
            self._retired_nodes.append(nodes)  # closed at the next subscription, or at the end
            raise
        self._nodes, self._nodes_tracked, self._nodes_opened = nodes, track, True

    async def _cluster_get(self, client: RedisCluster, keys: list[str], operation: str) -> Any:
        if not keys:
            return []
        nodes = self._nodes
        if nodes is None:
            # Between a fault and the next subscription: the client splits the reads by node.
            return await self._run("MGET", client.mget_nonatomic(keys), operation=operation)
        try:
            return await self._read("GET", nodes.get(keys), operation)
        except StoreError as exc:
            if not isinstance(exc.__cause__, MovedError | AskError | NodeLost):
                raise
            # The slot map moved (a resharding, a failover): this read goes through the
            # client, which follows it; the listener opens the nodes again from the new map,
            # and the sync re-reads every service (it counts as a fault).
            logger.info("Redis Cluster slots moved; reading the slot map again")
            return await self._run("MGET", client.mget_nonatomic(keys), operation=operation)

    def _node_invalidated(self, data: Any) -> None:
        self._pushed.append(self._invalidated(data))

    def _node_lost(self) -> None:
        self._tracking_broken = True

    def _refuse_tracking(self, exc: BaseException) -> None:
        self.tracking_refused = True
        logger.warning(
            "Redis refused client tracking; changes made past the gateways are found by the"
            " slow re-read only (error=%s)",
            _safe(exc, self.settings.url, self.settings.sentinel_password),
        )

    async def _invalidation_pushed(self, response: Any) -> None:
        data = response[1] if isinstance(response, list) and len(response) > 1 else None
        self._pushed.append(self._invalidated(data))

    async def _connection_remade(self, connection: Any) -> None:
        # redis-py re-made a tracked or subscriber connection in place: tracking is lost.
        self._tracking_broken = True

    def _invalidated(self, data: Any) -> Invalidated:
        """Which of our services' state or policy keys Redis says changed (None: all)."""
        if data is None:
            return Invalidated(everything=True)
        states, policies = [], []
        prefix = f"{self.settings.key_prefix}:"
        for item in data if isinstance(data, list) else [data]:
            key = _text(item)
            if key is None or not key.startswith(prefix):
                continue
            service, _, kind = key[len(prefix) :].rpartition(":")
            if service.startswith("{") and service.endswith("}"):
                service = service[1:-1]
            if service not in self._services:
                continue
            if kind == "state":
                states.append(service)
            elif kind == "policy":
                policies.append(service)
        return Invalidated(states=tuple(states), policies=tuple(policies))

    @property
    def _listen_timeout(self) -> float:
        # With Sentinel the listener looks up often enough to follow a new master at once.
        # On a Cluster, often enough to pass on the nodes' invalidations promptly. Otherwise
        # often enough to notice a lost tracking connection within a second.
        return {"sentinel": 0.25, "cluster": STALE_GRACE_SECONDS}.get(self.topology.kind, 1.0)

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
        self._retire_tracking()
        await self._close_retired()
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
            snapshot = state_from_doc(doc["state"])  # no bigger than the announcement
        except (ValueError, RecursionError) as exc:
            self._drop("invalid_state", str(exc)[:120])
            return None
        return service, snapshot  # on Redis's clock: shifted once verified

    async def _verify(
        self, announced: dict[str, list[BreakerSnapshot]]
    ) -> list[tuple[str, BreakerSnapshot]]:
        """The announced states the store holds (or newer ones); forgeries are dropped.

        An announcement is a hint; the stored value is the fleet's state. One read, in the
        listener, of the states newer than the last ones this store read (a burst of them
        together: one MGET, or one pipeline a node).
        """
        names = []
        for service, snapshots in announced.items():
            cached = self._decoded.get(service)
            known = cached[1].version if cached is not None and cached[1] is not None else -1
            # What is not newer than the last read says nothing new (the sync ignores it).
            snapshots[:] = [s for s in snapshots if not 0 <= known - s.version <= 2**52]
            if snapshots:
                names.append(service)
        if not names:
            return []
        keys = [self.key(service) for service in names]
        client = self._redis()
        if (tracked := self._tracked) is not None:
            values = await self._read("MGET", tracked.mget(keys), "get")
        elif isinstance(client, RedisCluster):
            values = await self._cluster_get(client, keys, "get")
        else:
            values = await self._run("MGET", client.mget(keys), operation="get")
        verified = []
        for service, raw in zip(names, values, strict=True):
            self._stale.pop(service, None)  # read (and tracked) again after its invalidation
            stored = None if raw is None else self._decode(service, raw)
            held = False
            for snapshot in announced[service]:
                # Both on our clock with the same offset (a re-read may have moved it).
                said = _shift(snapshot, -self.offset)
                if stored is not None and (
                    stored == said
                    or stored.version > said.version
                    or said.version - stored.version > 2**52  # the version started again at 1
                ):
                    held = True
                else:
                    self._drop(
                        "forged",
                        "the announced state is not the stored one (forged, or lost in a failover)",
                    )
            if held and stored is not None:
                verified.append((service, stored))
        return verified

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
            if snapshot is not None:
                snapshot = self._clamp(service, snapshot)
            self._decoded[service] = (raw, snapshot)
        return None if snapshot is None else _shift(snapshot, -self.offset)

    def _clamp(self, service: str, snapshot: BreakerSnapshot) -> BreakerSnapshot:
        """A period that starts in the future would never end: it starts now (counted). Once
        per stored value (cached with it), so that the period does not start again on every
        re-read. Redis's clock."""
        now = self._clock() + self.offset
        late = [
            name
            for name, at in (("opened_at", snapshot.opened_at), ("closed_at", snapshot.closed_at))
            if at is not None and at > now + 1
        ]
        if not late:
            return snapshot
        self.rejected("future_time", f"service={service}: {', '.join(late)} in the future")
        times = dict.fromkeys(late, now)
        return replace(snapshot, **times)  # type: ignore[arg-type]


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


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def _wrong_type(exc: StoreError) -> bool:
    return isinstance(exc.__cause__, ResponseError) and "WRONGTYPE" in str(exc.__cause__)


def _safe(exc: BaseException, url: str | None, *secrets: str | None) -> str:
    """The error text with every secret of the URL (and `secrets`) masked."""
    text = str(exc)
    for secret in url_secrets(url, *secrets):
        text = text.replace(secret, "***")
    return redact_secrets(text)
