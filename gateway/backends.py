"""What the backing stores' failures look like, in one leaf module: the exception classes of an outage
(mapped to `503 auth_unavailable`, never a verdict on a key) as opposed to a bug (`500 internal_error`)."""

from __future__ import annotations

from typing import TypeAlias

import asyncpg
from redis.exceptions import RedisClusterException, RedisError

from gateway._breaker import BreakerOpen
from gateway.errors import AuthUnavailable

# What Postgres being unable to serve looks like from asyncpg: refused, reset, timed out, and the
# server's own "not now" classes: 08 connection exceptions, 53 insufficient resources (too many
# connections, out of memory, disk full), 57 operator intervention (shutting down, crashed, starting,
# query cancelled), 58 system errors (I/O).
_ASYNCPG_OUTAGES: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.PostgresSystemError,
)
PG_ERRORS: tuple[type[BaseException], ...] = (OSError, TimeoutError, *_ASYNCPG_OUTAGES)

# What a failed Redis call raises (these trip the breaker). RuntimeError: under uvloop, redis-py writing on
# a connection the server has just reset raises it instead of a connection error (uvloop issue #506); the
# calls wrapped with these are single Redis commands or pipelines, so nothing else raises it there.
# RedisClusterException: what redis-py's cluster client raises, outside RedisError, when no node answers,
# the nodes disagree on the slots mid-failover or a slot has no master (SlotNotCoveredError).
REDIS_ERRORS: tuple[type[BaseException], ...] = (
    RedisError,
    RedisClusterException,
    OSError,
    TimeoutError,
    RuntimeError,
)
# ... and what a caller that falls back must catch: those, or the breaker skipping Redis.
REDIS_UNAVAILABLE: tuple[type[BaseException], ...] = (*REDIS_ERRORS, BreakerOpen)

# An outage of either store that reached a request handler unmapped: still answered 503, not 500. Narrower
# than the tuples above (no bare OSError or RuntimeError, which a bug raises too).
OUTAGES: tuple[type[BaseException], ...] = (
    *_ASYNCPG_OUTAGES,
    RedisError,
    RedisClusterException,
    BreakerOpen,
    ConnectionError,
    TimeoutError,
)


# asyncpg's own errors that are ours, not the server's: an argument of the wrong type (its client-side
# DataError, a ValueError), a bad client configuration, a feature one side lacks. A bug, never an outage,
# though they are InterfaceErrors like a closed connection.
NOT_OUTAGES: tuple[type[BaseException], ...] = (
    ValueError,
    asyncpg.exceptions.ClientConfigurationError,
    asyncpg.exceptions.UnsupportedClientFeatureError,
    asyncpg.exceptions.UnsupportedServerFeatureError,
)


def pg_outage(exc: BaseException) -> bool:
    """Postgres could not serve (PG_ERRORS), as opposed to our call being wrong."""
    return isinstance(exc, PG_ERRORS) and not isinstance(exc, NOT_OUTAGES)


def outage(exc: BaseException) -> bool:
    """A store's failure that reached a request unmapped (OUTAGES), as opposed to a bug."""
    return isinstance(exc, OUTAGES) and not isinstance(exc, NOT_OUTAGES)


class StoreUnavailable(AuthUnavailable):
    """Postgres could not be reached in time (or its breaker is open): an outage, answered 503."""


# A connection to Postgres as our code receives it: made alone (the listener's, migrations) or lent by a
# pool (asyncpg's typed stubs tell the two apart). A string: asyncpg's classes are not generic at run time.
Conn: TypeAlias = "asyncpg.Connection[asyncpg.Record] | asyncpg.pool.PoolConnectionProxy[asyncpg.Record]"
Pooled: TypeAlias = "asyncpg.pool.PoolConnectionProxy[asyncpg.Record]"
