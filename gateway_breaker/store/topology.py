"""What a Redis URL names (one server, a Sentinel-watched master, or a Cluster) and the clients
that reach it: the shared pool, and the connections of their own that client tracking needs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

try:  # redis-py >= 7
    from redis.maint_notifications import MaintNotificationsConfig
except ImportError:  # pragma: no cover - older redis-py
    MaintNotificationsConfig = None  # type: ignore[assignment,misc]

from gateway_breaker.config import RedisSettings, redact_url
from gateway_breaker.errors import ConfigError


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

    def __repr__(self) -> str:
        # The URL and the password are secrets: never in a repr (a log line, a traceback).
        return (
            f"RedisTopology(kind={self.kind!r}, url={redact_url(self.url)!r},"
            f" hosts={self.hosts!r}, service_name={self.service_name!r}, db={self.db!r},"
            f" username={self.username!r}, password={None if self.password is None else '***'!r})"
        )

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
        if kind == "cluster" and not hasattr(RedisCluster, "pubsub"):
            # The announcements' subscription needs the asyncio cluster's pub/sub (redis-py 8).
            raise ConfigError(
                f"redis.url: redis+cluster:// needs redis-py 8.0 or newer"
                f" (installed: {redis.__version__})"
            )
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

    def node_client(self, s: RedisSettings, host: str, port: int) -> Redis:
        """One connection of its own to one node of a Cluster, with the data nodes' credentials
        and no retry: a broken connection is reported, never re-made behind the caller's back
        (client tracking would be lost with it)."""
        common = _common(s, retries=0)
        auth: dict[str, Any] = {"username": self.username, "password": self.password}
        return Redis(host=host, port=port, single_connection_client=True, **auth, **common)

    def client(self, s: RedisSettings) -> Redis | RedisCluster:
        """A client with one connection pool of `s.pool_size`, explicit timeouts, no retries."""
        # One immediate retry, on a broken connection only: a pooled connection that died
        # with a restarted server fails once. Writes are compare-and-set, so a retry is safe;
        # longer outages are the sync loop's, with its own backoff.
        common = _common(s, retries=1)
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


def _common(s: RedisSettings, *, retries: int) -> dict[str, Any]:
    common: dict[str, Any] = {
        "socket_timeout": s.socket_timeout_seconds,
        "socket_connect_timeout": s.connect_timeout_seconds,
        "retry": Retry(NoBackoff(), retries, supported_errors=(RedisConnectionError,)),
        "client_name": "gateway-breaker",
    }
    if MaintNotificationsConfig is not None:
        # Off: Redis 7 does not know it, and "auto" also skips the stale-connection check.
        common["maint_notifications_config"] = MaintNotificationsConfig(enabled=False)
    return common


class _OwnPool(ConnectionPool):
    """The tracked connection's pool: a read still finishing when its client was closed gives
    back a connection the closed pool no longer knows, which is no error."""

    async def release(self, connection: Any) -> None:
        with contextlib.suppress(KeyError):
            await super().release(connection)


class _OwnSentinelPool(SentinelConnectionPool):
    async def release(self, connection: Any) -> None:
        with contextlib.suppress(KeyError):
            await super().release(connection)


def dedicated(client: Redis) -> Redis:
    """One connection of its own, to the same server with the same settings, outside the
    shared pool (a pool of `pool_size` keeps all its connections for writes and leases)."""
    pool = client.connection_pool
    kwargs = {k: v for k, v in pool.connection_kwargs.items() if k != "connection_pool"}
    kwargs["connection_class"] = pool.connection_class
    own: ConnectionPool
    if isinstance(pool, SentinelConnectionPool):
        own = _OwnSentinelPool(  # type: ignore[no-untyped-call]
            pool.service_name, pool.sentinel_manager, max_connections=1, **kwargs
        )
    else:
        own = _OwnPool(max_connections=1, **kwargs)
    return Redis(connection_pool=own, single_connection_client=True)
