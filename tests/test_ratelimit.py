"""Rate limits with real Redis: exact at the boundary, shared across processes, safe when Redis is not."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.app import create_app
from gateway.config import LimitConfig
from gateway.keys import KeyFormat
from gateway.metrics import Metrics
from gateway.ratelimit import Decision, Limit, LocalLimiter, parse_rate
from gateway.typedefs import METRICS, RESOLVER
from tests.conftest import ROOT, Services, World, make_config, nginx_headers, start_gateway

Client = Any
PUBLIC = str(ROOT / "config/policy.yaml")


async def app_with(aiohttp_client: Any, services: Services, **limits: Any) -> Client:
    return await aiohttp_client(create_app(make_config(services, rate_limits=limits, policy_file=PUBLIC)))


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
    limits = "rate_limits: {key: {rate: 1/1h, burst: 20}}\n"
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
    await asyncio.sleep(1.1)  # past the breaker's pause
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


async def test_wrong_secrets_for_one_key_id_stop_costing_argon2(
    aiohttp_client: Any, services: Services, clean: None, world: World
) -> None:
    # Every argon2 run of a key id is charged: the holder's first verification, then three guesses.
    c = await app_with(
        aiohttp_client,
        services,
        failures_per_key={"rate": "1/1h", "burst": 4},
        failures_per_address={"rate": "1/1h", "burst": 1000},
    )
    k = await world.key(orgs=[world.org_a])
    # The real holder uses the key from its own address first.
    holder = {"X-Forwarded-For": "192.0.2.10"}
    assert (await c.get("/auth/nginx", headers=nginx_headers(k["key"], **holder))).status == 200
    metrics = c.app[METRICS]
    before = metrics.argon2._value.get()
    codes = []
    for i in range(10):  # an attacker, from many addresses, each guess a new secret
        r = await c.get(
            "/auth/nginx", headers=nginx_headers(wrong_secret(k["id"]), **{"X-Forwarded-For": f"203.0.113.{i}"})
        )
        codes.append(r.headers["X-Auth-Error"])
    assert codes[:3] == ["invalid_api_key"] * 3
    assert codes[3:] == ["rate_limited"] * 7
    assert metrics.argon2._value.get() - before == 3  # no argon2 once the key id is under attack
    # The holder's key is still good: from its cache, and even with every cache emptied.
    assert (await c.get("/auth/nginx", headers=nginx_headers(k["key"], **holder))).status == 200
    c.app[RESOLVER].local.clear()
    await c.app[RESOLVER].invalidate([k["id"]])
    assert (await c.get("/auth/nginx", headers=nginx_headers(k["key"], **holder))).status == 200


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
