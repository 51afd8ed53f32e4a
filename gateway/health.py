"""Readiness and the state of the backing stores, as /readyz and the metrics report them.

A process is ready once it can decide (config and policy loaded, first store connections made) and until
it starts draining after SIGTERM. The state of Postgres and Redis is reported but never makes a process
unready: an outage shared by every replica must not take them all out of service while cached keys and
fallbacks still answer.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import asyncpg

from gateway._breaker import Breaker, guarded
from gateway.backends import REDIS_ERRORS, REDIS_UNAVAILABLE, StoreUnavailable
from gateway.data.db import ping
from gateway.redis_client import RedisClient, ping_redis
from gateway.store import Store


@dataclass
class Lifecycle:
    ready: bool = False  # start-up finished: stores connected, policy loaded
    draining: bool = False  # SIGTERM received: still serving, but asking to be taken out of rotation


async def watch_backends(store: Store, redis: RedisClient, redis_breaker: Breaker, interval_s: float) -> None:
    """Ping Postgres and Redis through their breakers, forever. Keeps the reported state current when
    no traffic arrives, and probes a failed backend so it is found healthy again without traffic."""
    while True:
        await asyncio.sleep(interval_s)
        with contextlib.suppress(StoreUnavailable):
            await store.ping()
        if store.replica is not None:
            with contextlib.suppress(StoreUnavailable, asyncpg.PostgresError):
                await store.replica.run(ping)
        with contextlib.suppress(*REDIS_UNAVAILABLE):
            await guarded(redis_breaker, lambda: ping_redis(redis), REDIS_ERRORS, "ping")


def backend_checks(store: Store, redis_breaker: Breaker) -> dict[str, str]:
    """The state of each store as last seen (no I/O: /readyz must answer at once in an outage)."""
    checks = {
        "postgres": "ok" if store.breaker.available else "unavailable",
        "redis": "ok" if redis_breaker.available else "unavailable",
    }
    if store.replica is not None:
        checks["postgres_replica"] = "ok" if store.replica.breaker.available else "unavailable"
    return checks
