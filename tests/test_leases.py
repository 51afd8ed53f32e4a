"""Rate-limit leases: a hot limit costs a Redis call per lease, never admits more than it allows."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from gateway import constants as C
from gateway._breaker import Breaker
from gateway.app import redis_client
from gateway.errors import AuthUnavailable
from gateway.leases import Lease, max_lease
from gateway.metrics import Metrics
from gateway.ratelimit import Limit, RateLimiter
from tests._faultproxy import FaultProxy
from tests.conftest import Services, World, make_config, nginx_headers, start_gateway


def test_a_cold_limit_takes_one_token_and_a_hot_one_grows() -> None:
    lease = Lease()
    assert lease.next_size(0.0, 100) == 1  # never granted: one token, exact
    lease.grant(0.0, 1, 50, 1e6, 0)
    assert lease.take(0.0) and not lease.take(0.0)
    assert lease.next_size(1.0, 100) == 1  # one request a second: still one at a time
    lease.grant(1.0, 1, 50, 1e6, 0)
    assert lease.take(1.0)
    sizes = []
    now = 1.0
    for _ in range(8):  # a request every millisecond: each lease twice the last, up to the cap
        now += 0.001 * max(lease.size, 1)
        size = lease.next_size(now, 100)
        sizes.append(size)
        lease.grant(now, size, 50, 1e6, 0)
        while lease.take(now):
            pass
    assert sizes[:5] == [2, 4, 8, 16, 32] and max(sizes) <= 100


def test_tokens_die_with_the_lease_and_a_refusal_is_remembered() -> None:
    lease = Lease()
    lease.grant(10.0, 5, 0, 1e6, 0)
    assert lease.take(10.0)
    assert not lease.take(10.0 + C.LEASE_S)  # ran out: the four left are lost, never spent late
    lease.grant(11.0, 0, 0, 3e6, 2e6)  # refused: nothing is free for 2 s
    assert lease.denied(12.9) and not lease.denied(13.0)
    assert lease.next_size(13.0, 100) == 1  # after a refusal, one token at a time again


def test_the_largest_lease_is_a_fraction_of_the_burst() -> None:
    assert max_lease(100, exact=False) == 10
    assert max_lease(5, exact=False) == 1  # small budgets (failures, sign-ins) stay exact
    assert max_lease(10**9, exact=False) == C.LEASE_MAX_TOKENS
    assert max_lease(1000, exact=True) == 1


@pytest.fixture
async def redis(services: Services, clean: None) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(services.redis.url)
    yield client
    await client.aclose()


async def _script_calls(client: aioredis.Redis) -> int:
    stats = await client.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval"))


async def test_a_hot_limit_costs_a_redis_call_per_lease(redis: aioredis.Redis) -> None:
    limiter = RateLimiter(redis, Metrics())
    limit = Limit("key", 100_000, 1000, 10_000)  # cap: 1,000 tokens a lease
    before = await _script_calls(redis)
    admitted = 0
    for _ in range(2000):
        (d,) = await limiter.check([(limit, "hot")])
        admitted += d.allowed
    calls = await _script_calls(redis) - before
    assert admitted == 2000
    assert calls < 60, calls  # 2,000 requests: leases of 1, 2, 4, ... instead of 2,000 round trips
    exact = Limit("key", 100_000, 1000, 10_000, exact=True)
    before = await _script_calls(redis)
    for _ in range(50):
        await limiter.check([(exact, "exact")])
    assert await _script_calls(redis) - before == 50  # exact: one round trip per request


async def test_concurrent_requests_share_one_refill(redis: aioredis.Redis) -> None:
    limiter = RateLimiter(redis, Metrics(), pipeline=False)
    limit = Limit("key", 1, 3_600_000, 200)  # cap 20
    await limiter.check([(limit, "k")])  # a first lease of one
    before = await _script_calls(redis)
    got = await asyncio.gather(*(limiter.check([(limit, "k")]) for _ in range(10)))
    assert all(d.allowed for (d,) in got)
    assert await _script_calls(redis) - before <= 4, "concurrent requests each took a lease of their own"


async def test_leases_never_admit_more_than_the_limit_and_refusals_cost_no_call(redis: aioredis.Redis) -> None:
    limiters = [RateLimiter(redis, Metrics()) for _ in range(3)]
    limit = Limit("key", 1, 3_600_000, 300)  # 300 at once, then one an hour; cap 30 a lease

    async def one(i: int) -> bool:
        (d,) = await limiters[i % 3].check([(limit, "shared")])
        return d.allowed

    results = [await one(i) for i in range(900)]
    admitted = sum(results)
    assert admitted <= 300
    assert admitted >= 300 - 3 * limit.lease_cap
    for p in range(3):  # once Redis refuses a process, it refuses until the retry time Redis named
        mine = results[p::3]
        assert not any(mine[mine.index(False) :]), p
    before = await _script_calls(redis)
    assert not any([await one(i) for i in range(30)])
    assert await _script_calls(redis) - before == 0  # a remembered refusal asks Redis nothing


async def test_remaining_counts_the_tokens_a_process_holds(redis: aioredis.Redis) -> None:
    limiter = RateLimiter(redis, Metrics())
    limit = Limit("key", 1, 3_600_000, 1000)  # cap 100
    remaining = []
    for _ in range(40):
        (d,) = await limiter.check([(limit, "r")])
        remaining.append(d.remaining)
    # As a client sees it: one fewer each request, whether the token came from Redis or a lease.
    assert remaining == list(range(999, 959, -1))


async def test_three_processes_stay_within_the_limit_with_leases(
    services: Services, clean: None, world: World, tmp_path: Path
) -> None:
    """The shared promise in its lease form: never more than the limit admitted, across processes, and
    no fewer than the limit less one largest lease per process. `exact: true` admits exactly the limit."""
    for exact, burst, n in ((False, 200, 450), (True, 20, 60)):
        limits = f"rate_limits: {{key: {{rate: 1/1h, burst: {burst}, exact: {str(exact).lower()}}}}}\n"
        gws = [await start_gateway(services, tmp_path, f"l{exact}{i}", config_yaml=limits) for i in range(3)]
        try:
            k = await world.key(name=f"k{exact}", orgs=[world.org_a])
            urls = [gw.url + "/auth/nginx" for gw in gws]
            async with aiohttp.ClientSession() as s:

                async def one(i: int, key: str = k["key"], urls: list[str] = urls) -> int:
                    async with s.get(urls[i % 3], headers=nginx_headers(key)) as r:
                        return r.status

                results = await asyncio.gather(*(one(i) for i in range(n)))
        finally:
            for gw in gws:
                gw.stop()
        admitted = results.count(200)
        assert results.count(200) + results.count(429) == n
        if exact:
            assert admitted == burst
        else:
            assert burst - 3 * max_lease(burst, exact=False) <= admitted <= burst, admitted


async def test_with_redis_down_leases_give_way_to_each_limits_fallback(services: Services, clean: None) -> None:
    client = aioredis.Redis.from_url(services.redis.url, socket_timeout=0.2, socket_connect_timeout=0.2)
    limiter = RateLimiter(client, Metrics())
    local = Limit("key", 1, 3_600_000, 100)  # cap 10
    closed = Limit("org", 1, 3_600_000, 100, on_redis_error="closed")
    for _ in range(5):
        await limiter.check([(local, "d"), (closed, "d")])
    services.redis.stop()
    try:
        allowed = [(await limiter.check([(local, "d")]))[0].allowed for _ in range(150)]
        with pytest.raises(AuthUnavailable):
            for _ in range(20):  # what the lease still holds, then the `closed` policy's 503
                await limiter.check([(closed, "d")])
    finally:
        services.redis.start()
        await client.aclose()
    # The lease's tokens (charged in Redis already), then the in-process GCRA with a fresh budget.
    assert 100 <= allowed.count(True) <= 100 + local.lease_cap and not any(allowed[-40:])


async def test_nobody_waits_for_the_breakers_probe_of_a_hung_redis(services: Services, clean: None) -> None:
    """Found by review: once the breaker let one call probe a hung Redis, and that call was a lease
    refill, every request for the key waited for it (the Redis timeout) instead of taking its fallback
    at once, as `exact: true` limits did."""
    with FaultProxy(services.redis.port) as proxy:
        cfg = make_config(services, redis={"url": f"redis://127.0.0.1:{proxy.port}", "timeout_ms": 300})
        client = redis_client(cfg)
        limiter = RateLimiter(client, Metrics(), Breaker("redis", cooldown_s=0.1))
        limit = Limit("key", 100_000, 1000, 10_000)
        try:
            await limiter.check([(limit, "k")])  # a lease of one, spent
            proxy.hang()
            await limiter.check([(limit, "k")])  # times out: the breaker opens
            await asyncio.sleep(0.15)  # past its cooldown: the next call is its probe

            async def timed() -> float:
                started = time.monotonic()
                (d,) = await limiter.check([(limit, "k")])
                assert d.allowed  # the `local` fallback
                return time.monotonic() - started

            waits = sorted(await asyncio.gather(*(timed() for _ in range(10))))
        finally:
            proxy.pass_()
            await client.aclose()
    assert waits[-1] >= 0.25 and waits[-2] < 0.1, waits  # the probe waits its timeout, nobody else
