"""Rate limits with real Redis: exact at the boundary, shared across processes, safe when Redis is not."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from gateway.app import create_app
from gateway.config import Argon2Config, LimitConfig
from gateway.data.db import Database
from gateway.keyring import Keyring, KeySpec
from gateway.keys import KeyFormat, SecretHasher
from gateway.metrics import Metrics
from gateway.ratelimit import Decision, Limit, LocalLimiter, RateLimiter, address_bucket, parse_rate
from gateway.redis_client import connect_redis
from gateway.typedefs import HASHER, METRICS, RESOLVER
from tests.conftest import ROOT, Client, Services, World, make_config, nginx_headers, start_gateway

PUBLIC = str(ROOT / "config/policy.yaml")


async def app_with(aiohttp_client: Any, services: Services, **limits: Any) -> Client:
    c: Client = await aiohttp_client(create_app(make_config(services, rate_limits=limits, policy_file=PUBLIC)))
    return c


async def statuses(c: Client, n: int, **kw: Any) -> list[int]:
    return [(await c.get("/auth/nginx", headers=nginx_headers(**kw))).status for _ in range(n)]


def test_parse_rate_and_local_gcra() -> None:
    assert parse_rate("100/1m") == (100, 60_000)
    assert parse_rate("10/s") == (10, 1000)
    assert parse_rate("5/30s") == (5, 30_000)
    limit = Limit("key", 1, 3_600_000, 3)
    local = LocalLimiter()
    got = [local.check(limit, "k").allowed for _ in range(4)]
    assert got == [True, True, True, False]
    assert local.check(limit, "other").allowed
    d = local.check(limit, "k")
    assert d.headers()["Retry-After"] == str(d.retry_after_s) and d.retry_after_s > 1000


async def test_exact_at_the_boundary(aiohttp_client: Any, services: Services, clean: None, world: World) -> None:
    c = await app_with(aiohttp_client, services, key={"rate": "1/1h", "burst": 5})
    k = await world.key(orgs=[world.org_a])
    rs = [await c.get("/auth/nginx", headers=nginx_headers(k["key"])) for _ in range(6)]
    assert [r.status for r in rs] == [200] * 5 + [429]
    assert [r.headers["RateLimit-Remaining"] for r in rs[:5]] == ["4", "3", "2", "1", "0"]
    assert rs[0].headers["RateLimit-Limit"] == "5"
    last = rs[5]
    assert last.headers["X-Auth-Error"] == "rate_limited"
    assert (await last.json())["error"]["code"] == "rate_limited"
    assert int(last.headers["Retry-After"]) > 0 and "RateLimit-Reset" in last.headers


async def test_per_key_override(aiohttp_client: Any, services: Services, clean: None, world: World) -> None:
    c = await app_with(aiohttp_client, services, key={"rate": "100/1m", "burst": 100})
    k = await world.key(orgs=[world.org_a], rate_limit="3/1h")
    assert await statuses(c, 4, key=k["key"]) == [200, 200, 200, 429]
    other = await world.key(name="other", orgs=[world.org_a])
    assert await statuses(c, 4, key=other["key"]) == [200] * 4


async def test_org_limit_is_shared_by_its_keys(
    aiohttp_client: Any, services: Services, clean: None, world: World
) -> None:
    c = await app_with(aiohttp_client, services, org={"rate": "1/1h", "burst": 4})
    a = await world.key(name="a", orgs=[world.org_a])
    b = await world.key(name="b", orgs=[world.org_a])
    assert await statuses(c, 2, key=a["key"]) == [200, 200]
    assert await statuses(c, 2, key=b["key"]) == [200, 200]
    assert await statuses(c, 1, key=a["key"]) == [429]
    assert await statuses(c, 1, key=b["key"]) == [429]
    other_org = await world.key(name="c", orgs=[world.org_b])
    assert await statuses(c, 1, key=other_org["key"]) == [200]


async def test_anonymous_vs_authenticated(aiohttp_client: Any, services: Services, clean: None, world: World) -> None:
    c = await app_with(aiohttp_client, services, anonymous={"rate": "1/1h", "burst": 3})
    assert await statuses(c, 4, uri="/docs/x") == [200, 200, 200, 429]
    r = await c.get("/auth/nginx", headers=nginx_headers(uri="/docs/x", **{"X-Forwarded-For": "198.51.100.4"}))
    assert r.status == 200  # another address has its own budget
    k = await world.key(orgs=[world.org_a])
    assert await statuses(c, 3, key=k["key"], uri="/docs/x") == [200] * 3  # a key is not anonymous


async def test_retry_after_is_honoured(aiohttp_client: Any, services: Services, clean: None, world: World) -> None:
    c = await app_with(aiohttp_client, services, key={"rate": "1/1s", "burst": 1})
    k = await world.key(orgs=[world.org_a])
    assert (await c.get("/auth/nginx", headers=nginx_headers(k["key"]))).status == 200
    r = await c.get("/auth/nginx", headers=nginx_headers(k["key"]))
    assert r.status == 429
    await asyncio.sleep(int(r.headers["Retry-After"]))
    assert (await c.get("/auth/nginx", headers=nginx_headers(k["key"]))).status == 200


async def test_shared_exactly_across_three_processes(
    services: Services, clean: None, world: World, tmp_path: Path
) -> None:
    limits = "rate_limits: {key: {rate: 1/1h, burst: 20, exact: true}}\n"  # leases: tests/test_leases.py
    gws = [await start_gateway(services, tmp_path, f"p{i}", config_yaml=limits) for i in range(3)]
    try:
        k = await world.key(orgs=[world.org_a])
        async with aiohttp.ClientSession() as s:

            async def one(i: int) -> int:
                async with s.get(gws[i % 3].url + "/auth/nginx", headers=nginx_headers(k["key"])) as r:
                    return r.status

            results = await asyncio.gather(*(one(i) for i in range(90)))
    finally:
        for gw in gws:
            gw.stop()
    assert results.count(200) == 20
    assert results.count(429) == 70


@pytest.fixture
def redis_outage(services: Services) -> Iterator[Services]:
    yield services
    if services.redis.proc is None:
        services.redis.start()


@pytest.mark.parametrize(
    ("policy", "after"), [("local", [200, 200, 429]), ("open", [200, 200, 200]), ("closed", [503, 503, 503])]
)
async def test_redis_stopped_mid_test(
    aiohttp_client: Any,
    services: Services,
    clean: None,
    world: World,
    redis_outage: Services,
    policy: str,
    after: list[int],
) -> None:
    c = await app_with(aiohttp_client, services, key={"rate": "1/1h", "burst": 2, "on_redis_error": policy})
    k = await world.key(orgs=[world.org_a])
    assert await statuses(c, 3, key=k["key"]) == [200, 200, 429]
    redis_outage.redis.stop()
    assert await statuses(c, 3, key=k["key"]) == after  # verification itself keeps working
    metrics = await (await c.get("/metrics")).text()
    assert f'gateway_ratelimit_fallback_total{{limit="key",policy="{policy}"}}' in metrics
    redis_outage.redis.start()
    # Back within a bounded time under continuous traffic. (It waited 1.1 s in quiet and then expected the
    # next three requests to pass; once, in CI, the first probe after the pause failed and the three fell
    # within the breaker's next pause.)
    deadline = time.monotonic() + 5
    while (await (await c.get("/readyz")).json())["checks"]["redis"] != "ok":
        assert time.monotonic() < deadline, "Redis not used again within 5 s of its restart"
        await statuses(c, 1, key=k["key"])
        await asyncio.sleep(0.05)
    k2 = await world.key(name="after", orgs=[world.org_a])
    assert await statuses(c, 3, key=k2["key"]) == [200, 200, 429]  # limits resume in Redis, no errors


async def test_redis_restarted_limits_resume(
    aiohttp_client: Any, services: Services, clean: None, world: World, redis_outage: Services
) -> None:
    c = await app_with(aiohttp_client, services, key={"rate": "1/1h", "burst": 2})
    k = await world.key(orgs=[world.org_a])
    assert await statuses(c, 1, key=k["key"]) == [200]
    redis_outage.redis.stop()
    redis_outage.redis.start()
    await asyncio.sleep(1.1)
    # Redis lost its state (no persistence here): the budget starts afresh, and nothing errors.
    assert await statuses(c, 3, key=k["key"]) == [200, 200, 429]


# --- brute force ---------------------------------------------------------------------------------


def wrong_secret(key_id: str) -> str:
    fmt = KeyFormat("gw")
    return fmt.build("live", key_id, fmt.generate("live")[0].split("_")[3][:43])


async def test_a_flood_of_wrong_secrets_does_not_lock_the_holder_out(
    aiohttp_client: Any, services: Services, clean: None, world: World
) -> None:
    """Issue 9, item 8: 400 wrong secrets for one key id, from one address and then from ten others, cost
    a bounded number of argon2 runs, and the key's holder still verifies at its first try, within
    seconds, from an address it never used, and from the one it used before with every cache emptied."""
    c = await app_with(
        aiohttp_client,
        services,
        failures_per_key={"rate": "1/1h", "burst": 5},
        failures_per_key_address={"rate": "1/1h", "burst": 2},
        failures_per_address={"rate": "1/1h", "burst": 30},
    )
    k = await world.key(orgs=[world.org_a])
    holder = {"X-Forwarded-For": "192.0.2.10"}
    assert (await c.get("/auth/nginx", headers=nginx_headers(k["key"], **holder))).status == 200
    metrics = c.app[METRICS]
    before = metrics.argon2._value.get()
    attackers = ["203.0.113.1"] * 200 + [f"198.51.100.{i % 10}" for i in range(200)]
    codes: collections.Counter[str] = collections.Counter()
    for address in attackers:  # each guess a new secret, so no negative cache entry answers it
        r = await c.get("/auth/nginx", headers=nginx_headers(wrong_secret(k["id"]), **{"X-Forwarded-For": address}))
        codes[r.headers["X-Auth-Error"]] += 1
        if r.status == 429:
            assert int(r.headers["Retry-After"]) >= 1
    # The holder, from an address it never verified from, at its first try, with nothing cached (another
    # replica, or later): its secret has to be verified again.
    resolver = c.app[RESOLVER]
    resolver.local.clear()
    await resolver.invalidate([k["id"]])
    started = time.monotonic()
    r = await c.get("/auth/nginx", headers=nginx_headers(k["key"], **{"X-Forwarded-For": "192.0.2.99"}))
    assert r.status == 200, await r.text()
    assert time.monotonic() - started < 2
    # The flood cost the key id's budget (4 left after the holder's first run), then 2 runs per address.
    runs = metrics.argon2._value.get() - before - 1
    assert runs == 4 + 11 * 2
    assert codes == {"invalid_api_key": runs, "rate_limited": len(attackers) - runs}
    # Its usual address keeps working too, even with every cache emptied.
    resolver.local.clear()
    await resolver.invalidate([k["id"]])
    assert (await c.get("/auth/nginx", headers=nginx_headers(k["key"], **holder))).status == 200


async def test_argon2_work_stays_bounded_during_a_flood(
    aiohttp_client: Any, services: Services, clean: None, world: World, pool: asyncpg.Pool
) -> None:
    """Wrong secrets from many addresses at once, with every budget wide open: at most
    `keys.verify_threads` verifications run and `keys.verify_queue` wait, the rest are refused at once
    with 503 auth_unavailable (an overload is never a 401), and the holder verifies once it is over."""
    high = {"rate": "1000000/1m", "burst": 100000}
    cfg = make_config(
        services,
        rate_limits={"failures_per_key": high, "failures_per_key_address": high, "failures_per_address": high},
        keys={"verify_threads": 1, "verify_queue": 2},
        policy_file=PUBLIC,
    )
    c = await aiohttp_client(create_app(cfg))
    # A key hashed with costly parameters (a verification uses the parameters of the stored hash).
    slow = SecretHasher(Argon2Config(memory_kib=32768, time_cost=3), 1)
    k = await Keyring(Database(pool), KeyFormat("gw"), slow, cfg.roles).create_key(
        KeySpec(user_id=world.user, name="k", role="admin", orgs=[world.org_a], projects=[], scopes=None)
    )
    slow.close()
    hasher, metrics = c.app[HASHER], c.app[METRICS]
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, hasher.admitted)
            await asyncio.sleep(0.001)

    async def guess(i: int) -> tuple[int, str, str]:
        key = k["key"] if i == 20 else wrong_secret(k["id"])  # the holder, amid the flood
        r = await c.get("/auth/nginx", headers=nginx_headers(key, **{"X-Forwarded-For": f"203.0.113.{i}"}))
        return r.status, r.headers.get("X-Auth-Error", ""), r.headers.get("Retry-After", "")

    watcher = asyncio.create_task(watch())
    try:
        answers = await asyncio.gather(*(guess(i) for i in range(40)))
    finally:
        watcher.cancel()
    assert peak <= 1 + 2
    refused = [a for a in answers if a[0] == 503]
    assert refused and all(code == "auth_unavailable" and retry == "1" for _, code, retry in refused)
    assert answers[20][0] in (200, 503)  # the holder is never told its key is bad, nor rate limited
    assert {status for status, _, _ in answers} <= {200, 401, 503}
    assert metrics.argon2_busy._value.get() == len(refused)
    assert metrics.argon2._value.get() == len(answers) - len(refused)
    r = await c.get("/auth/nginx", headers=nginx_headers(k["key"], **{"X-Forwarded-For": "192.0.2.99"}))
    assert r.status == 200


async def test_failures_per_address(aiohttp_client: Any, services: Services, clean: None, world: World) -> None:
    c = await app_with(aiohttp_client, services, failures_per_address={"rate": "1/1h", "burst": 5})
    raw = [KeyFormat("gw").generate("live")[0] for _ in range(7)]
    codes = [(await c.get("/auth/nginx", headers=nginx_headers(r))).headers["X-Auth-Error"] for r in raw]
    assert codes == ["invalid_api_key"] * 5 + ["rate_limited"] * 2
    k = await world.key(orgs=[world.org_a])
    other = {"X-Forwarded-For": "192.0.2.77"}
    assert (await c.get("/auth/nginx", headers=nginx_headers(k["key"], **other))).status == 200


def test_strictest_decision_wins() -> None:
    a, b = Limit("key", 10, 1000, 10), Limit("org", 10, 1000, 10)
    roomy = Decision(a, True, 8, 1, 0)
    tight = Decision(b, True, 2, 1, 0)
    refused = Decision(b, False, 0, 5, 3)
    assert Decision.strictest([roomy, tight]) is tight
    assert Decision.strictest([roomy, refused]) is refused
    assert LimitConfig().on_redis_error == "local"
    assert Metrics().ratelimit is not None


async def test_denials_say_where_the_caller_stands(
    aiohttp_client: Any, services: Services, clean: None, world: World
) -> None:
    c = await app_with(
        aiohttp_client, services, key={"rate": "1/1h", "burst": 5}, failures_per_address={"rate": "1/1h", "burst": 7}
    )
    k = await world.key(orgs=[world.org_a])
    r = await c.get("/auth/nginx", headers=nginx_headers(k["key"], **{"X-Org-Id": world.org_b}))
    assert (r.status, r.headers["RateLimit-Limit"], r.headers["RateLimit-Remaining"]) == (403, "5", "4")
    assert "Retry-After" not in r.headers
    r = await c.get("/auth/nginx", headers=nginx_headers(KeyFormat("gw").generate("live")[0]))
    assert (r.status, r.headers["RateLimit-Limit"], r.headers["RateLimit-Remaining"]) == (401, "7", "6")
    r = await c.get("/auth/nginx", headers=nginx_headers())  # no key, no limit applies: nothing to report
    assert r.status == 401 and "RateLimit-Limit" not in r.headers


async def test_failed_keys_count_whichever_endpoint_they_come_through(
    aiohttp_client: Any, services: Services, clean: None, world: World
) -> None:
    c = await app_with(aiohttp_client, services, failures_per_address={"rate": "1/1h", "burst": 3})
    fmt = KeyFormat("gw")
    bearer = {"Authorization": f"Bearer {fmt.generate('live')[0]}"}
    assert (await c.get("/v1/me", headers=bearer)).status == 401
    assert (await c.post("/ui/session", json={"key": fmt.generate("live")[0]})).status == 401
    r = await c.get("/auth/nginx", headers=nginx_headers(fmt.generate("live")[0]))
    assert r.headers["X-Auth-Error"] == "invalid_api_key"
    for probe in (
        c.get("/v1/me", headers={"Authorization": f"Bearer {fmt.generate('live')[0]}"}),
        c.post("/ui/session", json={"key": fmt.generate("live")[0]}),
    ):
        r = await probe
        assert (r.status, (await r.json())["error"]["code"]) == (429, "rate_limited")


@pytest.mark.parametrize(
    ("address", "bucket"),
    [
        ("203.0.113.9", "203.0.113.9"),
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("::ffff:203.0.113.9", "203.0.113.9"),
        (None, "unknown"),
    ],
)
def test_per_address_limits_charge_an_ipv6_64(address: str | None, bucket: str) -> None:
    assert address_bucket(address) == bucket


async def test_a_charge_is_one_round_trip_and_survives_a_script_flush(
    services: Services, clean: None, rclient: Any
) -> None:
    """redis-py sent a SCRIPT EXISTS before every pipeline that held the script (a second round trip on
    every refill); the pipeline now holds EVALSHA alone and loads the script only when Redis lacks it."""
    client = connect_redis(make_config(services).redis)
    try:
        limiter = RateLimiter(client, Metrics(), pipeline=False)
        limit = Limit("key", 100, 1000, 100, exact=True)
        await limiter.check([(limit, "a")])  # the script is loaded from here on
        await rclient.config_resetstat()
        for _ in range(5):
            await limiter.check([(limit, "a"), (limit, "b")])
        stats = await rclient.info("commandstats")
        assert stats["cmdstat_evalsha"]["calls"] == 10
        assert not [name for name in stats if name.startswith("cmdstat_script")]
        await rclient.script_flush()  # as after a restart, or a failover to a replica
        (decision,) = await limiter.check([(limit, "c")])
        assert decision.allowed and limiter.breaker.available
        assert "cmdstat_script|load" in await rclient.info("commandstats")
    finally:
        await client.aclose()
