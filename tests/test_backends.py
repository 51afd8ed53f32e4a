"""The stores' failures: what counts as an outage (503) and what is left to be a bug (500)."""

from __future__ import annotations

import asyncpg
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway._breaker import BreakerOpen
from gateway.backends import OUTAGES, PG_ERRORS, REDIS_UNAVAILABLE, StoreUnavailable, outage, pg_outage
from gateway.errors import AuthUnavailable


def test_a_store_outage_is_auth_unavailable() -> None:
    err = StoreUnavailable("the key store is unreachable")
    assert isinstance(err, AuthUnavailable)
    assert (err.status, err.code) == (503, "auth_unavailable")


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionRefusedError(),
        TimeoutError(),
        asyncpg.exceptions.TooManyConnectionsError(),
        asyncpg.exceptions.AdminShutdownError(),
        RedisConnectionError(),
        BreakerOpen(),
    ],
)
def test_what_an_outage_looks_like(exc: BaseException) -> None:
    assert isinstance(exc, OUTAGES)
    assert isinstance(exc, (*PG_ERRORS, *REDIS_UNAVAILABLE))  # the wider tuples, which the stores use


@pytest.mark.parametrize(
    "exc", [ValueError(), KeyError(), RuntimeError(), FileNotFoundError(), asyncpg.exceptions.UniqueViolationError()]
)
def test_a_bug_is_not_an_outage(exc: BaseException) -> None:
    """A bare RuntimeError or OSError is left to be a bug when it escapes: only the calls wrapped with the
    wider PG_ERRORS / REDIS_ERRORS treat those as the store's failure."""
    assert not isinstance(exc, OUTAGES)


def test_asyncpg_errors_of_our_own_making_are_bugs() -> None:
    """asyncpg raises a closed connection and a wrong argument type both as InterfaceErrors: only the
    first is Postgres failing to serve; the other is a bug (500), never a 503 nor a tripped breaker."""
    wrong_type = asyncpg.exceptions._base.DataError("invalid input for query argument $1")
    assert isinstance(wrong_type, PG_ERRORS) and not pg_outage(wrong_type) and not outage(wrong_type)
    closed = asyncpg.exceptions.InterfaceError("connection is closed")
    assert pg_outage(closed) and outage(closed)
    assert pg_outage(ConnectionRefusedError()) and outage(ConnectionResetError())
