"""The Redis client of each mode, made by redis-py's own classes: one server (`redis.url`), the master
Sentinel names (`redis.sentinel`, followed through failovers) or Redis Cluster (`redis.cluster`).

Every mode gets the same bounds: `redis.timeout_ms` on each connect and reply, no retry after a timeout
(a slow Redis costs one timeout, then the caller falls back), and one immediate retry on a new connection
after a connection error (after a restart or a failover every pooled connection is dead; without it each
would fail once, reopening the breaker each time). Key names carry hash tags (gateway/constants.py), so
commands that name several keys name keys of one slot, as Redis Cluster requires.
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeAlias

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.config import RedisConfig, host_port, redis_mode

# What the gateway's Redis callers hold: the two have the same commands, pipelines and scripts, except
# that a cluster pipeline cannot carry EVALSHA (see gateway/ratelimit.py).
RedisClient: TypeAlias = "aioredis.Redis | RedisCluster"


class BlockingSentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """The master's connections, found through Sentinel, capped like the single mode's: past
    `max_connections` a call waits up to the timeout for a free one (Sentinel's own pool would raise)."""


class BoundedCluster(RedisCluster):
    """Redis Cluster with the other modes' bound: at most `max_connections` commands at once, and past it
    a call waits up to the timeout for its turn (redis-py's cluster nodes would raise instead). Pipelines
    (cache fills, sessions) take a connection per node on top: each node's pool allows twice as many."""

    def __init__(self, *, max_connections: int, wait_s: float, **kwargs: Any) -> None:
        super().__init__(max_connections=2 * max_connections, **kwargs)
        self._turns = asyncio.Semaphore(max_connections)
        self._wait_s = wait_s

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if self._initialize:  # once, alone: commands racing the first discovery of the nodes can fail
            await self.initialize()
        try:
            async with asyncio.timeout(self._wait_s):
                await self._turns.acquire()
        except TimeoutError:
            raise RedisTimeoutError("no free Redis connection within the timeout") from None
        try:
            return await super().execute_command(*args, **kwargs)
        finally:
            self._turns.release()


def _retry() -> Retry:
    # RuntimeError: what uvloop raises on writing to a connection the server reset (uvloop issue #506).
    return Retry(NoBackoff(), 1, (RedisConnectionError, RuntimeError))  # type: ignore[arg-type]


def connect_redis(cfg: RedisConfig, client_name: str = "gateway") -> RedisClient:
    """A client for the configured mode. Nothing is connected yet: each connection is made on first use
    (the cluster's layout too), so a Redis that is down at start-up is an outage like any other."""
    timeout = cfg.timeout_ms / 1000
    common: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "client_name": client_name,
    }
    mode = redis_mode(cfg)
    if mode == "single":
        pool = aioredis.BlockingConnectionPool.from_url(
            cfg.url.get(), max_connections=cfg.max_connections, timeout=timeout, retry=_retry(), **common
        )
        return aioredis.Redis.from_pool(pool)
    username, password = cfg.username or None, cfg.password.get() or None
    if mode == "sentinel":
        sentinels = [host_port(a, "redis.sentinel.addresses") for a in cfg.sentinel.addresses]
        sentinel_auth = {"password": cfg.sentinel.password.get() or None}
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            sentinels,
            sentinel_kwargs={"socket_timeout": timeout, "socket_connect_timeout": timeout, **sentinel_auth},
        )
        client: aioredis.Redis = sentinel.master_for(
            cfg.sentinel.master,
            redis_class=aioredis.Redis,
            connection_pool_class=BlockingSentinelPool,
            max_connections=cfg.max_connections,
            timeout=timeout,
            retry=_retry(),
            ssl=cfg.tls,
            username=username,
            password=password,
            **common,
        )
        return client
    nodes = [ClusterNode(*host_port(a, "redis.cluster.addresses")) for a in cfg.cluster.addresses]
    return BoundedCluster(
        startup_nodes=nodes,
        # Slots of a failed master are refused at once while the other masters' slots are served.
        require_full_coverage=False,
        max_connections=cfg.max_connections,
        wait_s=timeout,
        retry=_retry(),
        ssl=cfg.tls,
        username=username,
        password=password,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        client_name=client_name,
    )


def is_cluster(client: RedisClient) -> bool:
    return isinstance(client, RedisCluster)


async def ping_redis(client: RedisClient) -> None:
    """One node answers: on a cluster, any one (a PING to all would fail while any master is down, and
    the breaker is there for calls that fail, not for slots nobody asked about)."""
    if isinstance(client, RedisCluster):
        await client.ping(target_nodes=RedisCluster.RANDOM)
    else:
        await client.ping()
