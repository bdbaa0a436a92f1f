"""A redis-py asyncio client for a parsed `redis_url`: one server, a Sentinel-managed primary, or a Cluster.

All three get the same budget: connects and reads bounded by `timeout`, one quick retry (it hides a dropped idle
connection or a primary that just moved; more would stretch a request past its deadline), and a pool that queues a
burst instead of failing it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff

from .redisurl import RedisTarget

__all__ = ["Connected", "connect"]

# Connections per process (per node, for a Cluster). A burst beyond this waits up to POOL_WAIT for a free one:
# queueing is local congestion, not an outage, so it may take longer than one Redis round trip.
MAX_CONNECTIONS = 100
POOL_WAIT = 2.5


@dataclass(frozen=True, slots=True)
class Connected:
    client: Redis | RedisCluster
    # Everything to close besides the client (the sentinels' own connections).
    closers: tuple[Callable[[], Awaitable[None]], ...] = ()
    sentinel: Sentinel | None = None


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel's pool (asks the sentinels where the primary is on every new connection) that queues a burst like
    the single-server pool, instead of raising "Too many connections"."""


def connect(target: RedisTarget, *, timeout: float, sentinel_password: str | None = None) -> Connected:
    """A client for `target`; nothing is connected until the first command."""
    common: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), retries=1),
    }
    tls: dict[str, Any] = {"ssl": True, "ssl_check_hostname": True, **dict(target.options)} if target.tls else {}
    if target.mode == "single":
        pool = BlockingConnectionPool.from_url(
            target.url, max_connections=MAX_CONNECTIONS, timeout=POOL_WAIT, health_check_interval=10, **common
        )
        return Connected(Redis(connection_pool=pool))
    credentials: dict[str, Any] = {"username": target.username, "password": target.password}
    if target.mode == "sentinel":
        assert target.service is not None
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            target.nodes,
            # The sentinels' own password is not the data nodes' (those are in the URL). Sentinels speak plain
            # TCP: rediss+sentinel:// is TLS to the data nodes.
            sentinel_kwargs={
                "socket_timeout": timeout,
                "socket_connect_timeout": timeout,
                # redis-py's default backs off and retries for seconds; the next sentinel is the better retry.
                "retry": Retry(NoBackoff(), retries=0),
                "password": sentinel_password,
            },
        )
        client = sentinel.master_for(
            target.service,
            connection_pool_class=_BlockingSentinelPool,
            db=target.db,
            max_connections=MAX_CONNECTIONS,
            timeout=POOL_WAIT,
            health_check_interval=10,
            # The data nodes' certificate is checked against the host name the sentinels announce for them.
            **tls,
            **credentials,
            **common,
        )
        return Connected(client, closers=(sentinel.aclose,), sentinel=sentinel)
    cluster = RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
        max_connections=MAX_CONNECTIONS,
        # `retry` (one, no backoff) stands for the whole Cluster too: its default backs off for seconds.
        **tls,
        **credentials,
        **common,
    )
    return Connected(cluster)
