"""The circuit breaker: closed, open for a cooldown, then half-open with one probe at a time."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway._breaker import CLOSED, HALF_OPEN, OPEN, Breaker, BreakerOpen, guarded


def _callers_allowed(b: Breaker, n: int) -> int:
    return sum(b.allow() for _ in range(n))


def test_closed_lets_everyone_through() -> None:
    b = Breaker("pg", cooldown_s=0.05)
    assert _callers_allowed(b, 100) == 100 and b.state == CLOSED and b.available


def test_open_skips_everyone_then_one_probe_while_the_others_keep_their_fallback() -> None:
    b = Breaker("pg", cooldown_s=0.05)
    b.failed()
    assert b.state == OPEN and not b.available
    assert _callers_allowed(b, 100) == 0
    time.sleep(0.06)
    assert _callers_allowed(b, 100) == 1  # exactly one probe
    assert b.state == HALF_OPEN
    b.succeeded()
    assert b.state == CLOSED and _callers_allowed(b, 10) == 10


def test_a_failed_probe_reopens_for_another_cooldown() -> None:
    b = Breaker("pg", cooldown_s=0.05)
    b.failed()
    time.sleep(0.06)
    assert b.allow()
    b.failed()
    assert b.state == OPEN and _callers_allowed(b, 10) == 0
    time.sleep(0.06)
    assert _callers_allowed(b, 10) == 1


def test_it_closes_under_continuous_traffic() -> None:
    """The bug this replaces: callers that were skipped re-tripped the breaker, so it never closed while
    requests kept arriving faster than its cooldown. Being skipped is not a failure."""
    b = Breaker("pg", cooldown_s=0.05)
    b.failed()
    backend_up_at = time.monotonic() + 0.1
    closed_at = None
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline and closed_at is None:
        if b.allow():  # the backend answers once it is back
            if time.monotonic() >= backend_up_at:
                b.succeeded()
                closed_at = time.monotonic()
            else:
                b.failed()
        time.sleep(0.001)
    assert closed_at is not None and closed_at - backend_up_at <= 0.05 + 0.02


def test_a_stuck_probe_hands_the_turn_on_after_a_cooldown() -> None:
    """A probe hung on a dead connection (or whose caller went away) must not hold recovery back."""
    b = Breaker("pg", cooldown_s=0.05)
    b.failed()
    time.sleep(0.06)
    assert b.allow()  # the probe, which never reports
    assert _callers_allowed(b, 10) == 0
    time.sleep(0.06)
    assert _callers_allowed(b, 10) == 1


def test_state_changes_are_reported_once_each() -> None:
    seen: list[tuple[str, str]] = []
    b = Breaker("redis", cooldown_s=0.01, on_change=lambda name, state: seen.append((name, state)))
    b.succeeded()
    b.failed()
    b.failed()
    time.sleep(0.02)
    b.allow()
    b.succeeded()
    assert seen == [("redis", OPEN), ("redis", HALF_OPEN), ("redis", CLOSED)]


async def test_guarded_records_outcomes_and_skips_while_open() -> None:
    b = Breaker("redis", cooldown_s=10)
    calls = 0

    async def ok() -> int:
        nonlocal calls
        calls += 1
        return 7

    async def boom() -> int:
        raise ConnectionError("down")

    assert await guarded(b, ok, (ConnectionError,), "op") == 7
    with pytest.raises(ConnectionError):
        await guarded(b, boom, (ConnectionError,), "op")
    assert b.state == OPEN
    with pytest.raises(BreakerOpen):
        await guarded(b, ok, (ConnectionError,), "op")
    assert calls == 1  # skipped, not called


async def test_errors_outside_the_backend_set_do_not_trip_it() -> None:
    b = Breaker("redis", cooldown_s=10)

    async def bug() -> int:
        raise ValueError("a bug, not an outage")

    with pytest.raises(ValueError):
        await guarded(b, bug, (ConnectionError,), "op")
    assert b.state == CLOSED


async def test_every_failed_call_is_reported_and_a_skipped_one_is_not() -> None:
    failures: list[str] = []
    b = Breaker("postgres", cooldown_s=10, on_failure=failures.append)

    async def boom() -> int:
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        await guarded(b, boom, (ConnectionError,), "op")
    for _ in range(5):  # skipped while open: the store was not called, so nothing failed
        with pytest.raises(BreakerOpen):
            await guarded(b, boom, (ConnectionError,), "op")
    assert failures == ["postgres"]


async def test_every_call_made_is_timed_and_a_skipped_one_is_not() -> None:
    timed: list[tuple[str, str, float]] = []
    b = Breaker("redis", cooldown_s=10, on_latency=lambda *t: timed.append(t))

    async def slow() -> int:
        await asyncio.sleep(0.02)
        return 1

    async def boom() -> int:
        raise ConnectionError("down")

    assert await guarded(b, slow, (ConnectionError,), "cache_get") == 1
    with pytest.raises(ConnectionError):
        await guarded(b, boom, (ConnectionError,), "cache_put")
    with pytest.raises(BreakerOpen):
        await guarded(b, slow, (ConnectionError,), "cache_get")
    assert [(backend, op) for backend, op, _ in timed] == [("redis", "cache_get"), ("redis", "cache_put")]
    assert timed[0][2] >= 0.02
