"""On a Cluster: state and policy reads batched by node, on connections each node tracks.

Every master node gets two connections of its own: a reader, on which all the node's keys of a
read go as one pipeline (all nodes at once: one round trip for any number of keys, where a
command per key went before), tracked by that node (`CLIENT TRACKING on REDIRECT`); and a
subscriber to `__redis__:invalidate` on the same node, where the node sends the invalidations of
the keys read on the reader: a `redis-cli SET`, a `DEL` or an expiry on any node reaches the
instance as on a single Redis.

Cost: two connections a node, one task a node; nothing at rest; one message a changed key.
A failed read, a key the slot map puts elsewhere (`MOVED` after a resharding), a node lost or
re-made (a failover): `lost` is called, every node's connections are dropped, and the store's
listener opens them again from a fresh slot map (the sync then re-reads every service).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

INVALIDATE_CHANNEL = "__redis__:invalidate"


class NodeLost(RedisError):
    """A key's slot belongs to a node this instance has no reader for (the map moved)."""


class ClusterNodes:
    """Tracked readers and invalidation subscribers, one of each per master node."""

    def __init__(
        self,
        cluster: RedisCluster,
        connect: Callable[[str, int], Redis],
        on_invalidate: Callable[[Any], None],
        lost: Callable[[], None],
    ) -> None:
        self._cluster = cluster
        self._connect = connect
        self._on_invalidate = on_invalidate
        self._lost = lost
        self._readers: dict[str, Redis] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._clients: list[Redis] = []  # every connection made, closed by `aclose`
        self._pubsubs: list[Any] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    async def open(self, *, track: bool, refresh: bool) -> None:
        """Connect to every master node (with `refresh`: after reading the slot map again);
        with `track`, have each node track the reads and report changes. Raises RedisError
        (ResponseError: tracking refused) or OSError."""
        await self._cluster.initialize()
        if refresh:
            await self._cluster.nodes_manager.initialize()
        for node in self._cluster.get_primaries():
            host, port = str(node.host), int(node.port)
            if not track:
                self._readers[node.name] = reader = self._connect(host, port)
                self._locks[node.name] = asyncio.Lock()
                self._clients.append(reader)
                continue
            subscriber = self._connect(host, port)
            self._clients.append(subscriber)
            pubsub: Any = subscriber.pubsub()
            self._pubsubs.append(pubsub)
            await pubsub.connect()
            connection: Any = pubsub.connection
            await connection.send_command("CLIENT", "ID")
            subscriber_id = await connection.read_response()
            if isinstance(subscriber_id, RedisError):
                raise subscriber_id
            reader = self._connect(host, port)
            self._clients.append(reader)
            await reader.execute_command(  # type: ignore[no-untyped-call]
                "CLIENT", "TRACKING", "on", "REDIRECT", subscriber_id
            )
            # RESP2: invalidations arrive as messages on the channel; RESP3: as pushes.
            connection._parser.set_invalidation_push_handler(self._pushed)
            await pubsub.subscribe(INVALIDATE_CHANNEL)
            # redis-py re-makes a broken connection in place: Redis forgot the tracking then.
            connection.register_connect_callback(self._remade)
            if reader.connection is not None:
                reader.connection.register_connect_callback(self._remade)  # type: ignore[no-untyped-call]
            self._readers[node.name] = reader
            self._locks[node.name] = asyncio.Lock()
            self._tasks.append(asyncio.create_task(self._pump(pubsub), name="gateway-breaker-node"))

    async def get(self, keys: Sequence[str]) -> list[Any]:
        """The values of `keys` (None where missing): one pipeline a node, all nodes at once."""
        by_node: dict[str, list[int]] = {}
        slots = self._cluster.nodes_manager
        for index, key in enumerate(keys):
            node = slots.get_node_from_slot(self._cluster.keyslot(key))
            by_node.setdefault(node.name, []).append(index)
        values: list[Any] = [None] * len(keys)

        async def read(name: str, indexes: list[int]) -> None:
            reader = self._readers.get(name)
            if reader is None:
                raise NodeLost(f"no reader for node {name}: the slot map moved")
            # On the reader's own connection (a pipeline would take another from the pool,
            # which the node does not track); the lock keeps replies in order.
            async with self._locks[name]:
                connection: Any = reader.connection
                if connection is None:
                    await reader.initialize()
                    connection = reader.connection
                await connection.send_packed_command(
                    connection.pack_commands([("GET", keys[i]) for i in indexes])
                )
                for index in indexes:
                    values[index] = await connection.read_response()

        await asyncio.gather(*(read(name, indexes) for name, indexes in by_node.items()))
        return values

    async def _pump(self, pubsub: Any) -> None:
        """Hand this node's invalidations to the store; a lost subscription ends tracking."""
        try:
            while not self._closed:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is not None and message.get("type") == "message":
                    self._on_invalidate(message.get("data"))
        except asyncio.CancelledError:
            raise
        except Exception:  # any failure of the subscription: tracking is gone
            if not self._closed:
                self._lost()

    async def _pushed(self, response: Any) -> None:
        self._on_invalidate(
            response[1] if isinstance(response, list) and len(response) > 1 else None
        )

    async def _remade(self, connection: Any) -> None:
        if not self._closed:
            self._lost()

    async def aclose(self, seconds: float) -> None:
        """Stop the tasks and close every connection, each step bounded by `seconds`."""
        self._closed = True
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=seconds)
        for pubsub in self._pubsubs:
            with contextlib.suppress(RedisError, OSError, RuntimeError, TimeoutError):
                async with asyncio.timeout(seconds):
                    await pubsub.aclose()
        for client in self._clients:
            with contextlib.suppress(RedisError, OSError, RuntimeError, TimeoutError):
                async with asyncio.timeout(seconds):
                    await client.aclose()
        self._pubsubs, self._clients, self._readers = [], [], {}
