"""The cache tiers: cross-process invalidation, races, outages."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from gateway import constants as C
from gateway.cache import Entry, LocalCache, RedisCache
from gateway.keys import digest
from tests.conftest import PEPPER, Client, GatewayProcess, Services, World, corrupt, nginx_headers, poll, start_gateway


async def _get(session: aiohttp.ClientSession, gw: GatewayProcess, key: str) -> tuple[int, str]:
    async with session.get(f"{gw.url}/auth/nginx", headers=nginx_headers(key)) as r:
        return r.status, r.headers.get("X-Auth-Error", "")


@pytest.fixture
async def two_gateways(services: Services, clean: None, tmp_path: Path) -> AsyncIterator[list[GatewayProcess]]:
    gws = [await start_gateway(services, tmp_path, "a"), await start_gateway(services, tmp_path, "b")]
    yield gws
    for gw in gws:
        gw.stop()


async def test_revocation_reaches_two_processes_within_one_second(
    two_gateways: list[GatewayProcess], world: World
) -> None:
    k = await world.key(orgs=[world.org_a])
    async with aiohttp.ClientSession() as session:
        for gw in two_gateways:  # warm both in-process caches
            assert await _get(session, gw, k["key"]) == (200, "")
            assert await _get(session, gw, k["key"]) == (200, "")
        revoked_at = time.monotonic()
        await world.keyring.revoke_key(k["id"])
        delays = []
        for gw in two_gateways:
            while True:
                status, code = await _get(session, gw, k["key"])
                if status == 401:
                    delays.append(time.monotonic() - revoked_at)
                    assert code == "revoked_api_key"
                    break
                assert time.monotonic() - revoked_at < 1.0, "revocation took over a second"
                await asyncio.sleep(0.01)
    print(f"revocation delay across processes: {max(delays) * 1000:.0f} ms")


async def test_membership_change_reaches_two_processes(two_gateways: list[GatewayProcess], world: World) -> None:
    k = await world.key(orgs=[world.org_a])
    async with aiohttp.ClientSession() as session:
        for gw in two_gateways:
            assert await _get(session, gw, k["key"]) == (200, "")
        await world.directory.remove_member(world.org_a, world.user)
        start = time.monotonic()
        for gw in two_gateways:
            while (await _get(session, gw, k["key"]))[0] == 200:
                assert time.monotonic() - start < 1.0
                await asyncio.sleep(0.01)
            assert await _get(session, gw, k["key"]) == (403, "org_not_allowed")


async def test_fill_racing_a_revocation_is_not_written_back(rclient: aioredis.Redis, world: World) -> None:
    """A reader that loaded the key before the revocation must not make it valid again."""
    k = await world.key(orgs=[world.org_a])
    shared = RedisCache(rclient, 300, 10, 300)
    from gateway.store import Store

    store = Store(world.pool, 2)
    d = digest(PEPPER.encode(), k["key"])
    before = await shared.lookup(k["id"], d)  # the filler reads the generation first...
    loaded = await store.load_key(k["id"])  # ...then Postgres, still active
    assert loaded is not None
    await world.keyring.revoke_key(k["id"])  # revocation commits and invalidates
    await shared.invalidate([k["id"]])
    await shared.put(d, Entry(loaded[0], time.time()), before.generation)  # the late fill lands
    after = await shared.lookup(k["id"], d)
    assert after.entry is None  # ...but under a stale generation, so it is never read as valid

    local = LocalCache(10, 30, 10)
    epoch = local.epoch
    local.invalidate([k["id"]])
    assert not local.put(d, Entry(loaded[0], time.time()), epoch)
    assert local.get(d) is None


async def test_local_cache_is_bounded(world: World) -> None:
    k = await world.key(orgs=[world.org_a])
    from gateway.store import Store

    loaded = await Store(world.pool, 2).load_key(k["id"])
    assert loaded is not None
    local = LocalCache(3, 30, 10)
    for i in range(10):
        local.put(f"d{i}", Entry(loaded[0], time.time()), local.epoch)
        local.put_negative(f"n{i}", "invalid_api_key", local.epoch)
    assert len(local) == 3
    assert local.get("d0") is None and local.get("d9") is not None
    assert local.get_negative("n0") is None and local.get_negative("n9") == "invalid_api_key"


async def test_negative_entries_are_kept_apart(client: Client, world: World, rclient: aioredis.Redis) -> None:
    from gateway.keys import KeyFormat

    k = await world.key(orgs=[world.org_a])
    fmt = KeyFormat("gw")
    wrong = fmt.build("live", k["id"], fmt.generate("live")[0].split("_")[3][:43])
    assert (await client.get("/auth/nginx", headers=nginx_headers(wrong))).status == 401
    assert (await client.get("/auth/nginx", headers=nginx_headers(k["key"]))).status == 200
    names = sorted(n.decode() if isinstance(n, bytes) else n for n in await rclient.keys("gw:*"))
    assert any(n.startswith("gw:neg:{" + k["id"] + "}:") for n in names)
    assert any(n.startswith("gw:key:{" + k["id"] + "}:") for n in names)
    # Digests, never the key itself, in any Redis key name or value.
    for n in names:
        assert k["key"] not in n
        kind = await rclient.type(n)
        if kind in (b"string", "string"):
            value = await rclient.get(n)
        else:
            value = b"".join(m if isinstance(m, bytes) else m.encode() for m in await rclient.smembers(n))
        assert k["key"].encode() not in (value or b"")


# --- outages -------------------------------------------------------------------------------------


@pytest.fixture
def pg_outage(services: Services) -> Iterator[Services]:
    yield services
    if services.pg.proc is None:
        services.pg.start()


@pytest.fixture
def redis_outage(services: Services) -> Iterator[Services]:
    yield services
    if services.redis.proc is None:
        services.redis.start()


async def test_postgres_down_warm_cache_keeps_working(
    client: Client, world: World, pg_outage: Services, rclient: aioredis.Redis
) -> None:
    k = await world.key(orgs=[world.org_a])
    cold = await world.key(name="cold", orgs=[world.org_a])
    assert (await client.get("/auth/nginx", headers=nginx_headers(k["key"]))).status == 200
    await world.pool.expire_connections()
    pg_outage.pg.stop()
    r = await client.get("/auth/nginx", headers=nginx_headers(k["key"]))
    assert r.status == 200
    r = await client.get("/auth/nginx", headers=nginx_headers(cold["key"]))
    assert (r.status, r.headers["X-Auth-Error"]) == (503, "auth_unavailable")
    pg_outage.pg.start()


async def test_postgres_down_past_stale_limit_is_unavailable(
    aiohttp_client: Any, services: Services, world: World, pg_outage: Services
) -> None:
    from gateway.app import create_app
    from tests.conftest import make_config

    cfg = make_config(services, cache={"local_ttl_s": 0.1, "redis_ttl_s": 0.2, "stale_if_error_s": 0.5})
    c = await aiohttp_client(create_app(cfg))
    k = await world.key(orgs=[world.org_a])
    assert (await c.get("/auth/nginx", headers=nginx_headers(k["key"]))).status == 200
    pg_outage.pg.stop()
    await asyncio.sleep(0.3)  # past the TTLs, within the stale window: still served
    assert (await c.get("/auth/nginx", headers=nginx_headers(k["key"]))).status == 200
    await asyncio.sleep(0.5)  # past the stale window
    r = await c.get("/auth/nginx", headers=nginx_headers(k["key"]))
    assert (r.status, r.headers["X-Auth-Error"]) == (503, "auth_unavailable")
    pg_outage.pg.start()


async def test_redis_down_falls_back_to_postgres(client: Client, world: World, redis_outage: Services) -> None:
    k = await world.key(orgs=[world.org_a])
    redis_outage.redis.stop()
    r = await client.get("/auth/nginx", headers=nginx_headers(k["key"]))
    assert r.status == 200
    bad = corrupt(k["key"])
    assert (await client.get("/auth/nginx", headers=nginx_headers(bad))).headers["X-Auth-Error"] == "invalid_api_key"
    await world.keyring.revoke_key(k["id"])
    r = await poll(lambda: client.get("/auth/nginx", headers=nginx_headers(k["key"])), lambda r: r.status != 200)
    assert r.headers["X-Auth-Error"] == "revoked_api_key"
    redis_outage.redis.start()
    await asyncio.sleep(0.1)
    k2 = await world.key(name="after", orgs=[world.org_a])
    assert (await client.get("/auth/nginx", headers=nginx_headers(k2["key"]))).status == 200


async def test_bad_checksum_touches_neither_postgres_nor_redis(
    client: Client, world: World, pg_outage: Services, redis_outage: Services
) -> None:
    k = (await world.key(orgs=[world.org_a]))["key"]
    bad = corrupt(k)
    pg_outage.pg.stop()
    redis_outage.redis.stop()
    r = await client.get("/auth/nginx", headers=nginx_headers(bad))
    # With both stores down, any lookup would have answered 503: this one never looked.
    assert (r.status, r.headers["X-Auth-Error"]) == (401, "invalid_api_key")
    metrics = await (await client.get("/metrics")).text()
    assert 'gateway_backend_errors_total{backend="postgres"}' not in metrics
    assert 'gateway_backend_errors_total{backend="redis"}' not in metrics
    pg_outage.pg.start()
    redis_outage.redis.start()


def test_constants_use_cluster_hash_tags() -> None:
    assert C.REDIS_KEY_ENTRY.format(key_id="abc", digest="d") == "gw:key:{abc}:d"
    assert C.REDIS_KEY_GENERATION.format(key_id="abc") == "gw:gen:{abc}"
    assert C.REDIS_NEGATIVE_ENTRY.format(key_id="abc", digest="d") == "gw:neg:{abc}:d"


async def test_revocation_while_redis_is_unreachable_is_not_undone(
    aiohttp_client: Any, services: Services, world: World, rclient: aioredis.Redis
) -> None:
    """Redis keeps its data but does not answer while the revocation is broadcast: the gateways retry
    the Redis invalidation until it lands, so a process with a cold cache never reads the key back."""
    from gateway.app import create_app
    from tests.conftest import make_config

    cfg = make_config(services)
    first = await aiohttp_client(create_app(cfg))
    k = await world.key(orgs=[world.org_a])
    assert (await first.get("/auth/nginx", headers=nginx_headers(k["key"]))).status == 200  # fills Redis
    assert await rclient.keys(f"gw:key:{{{k['id']}}}:*")
    await rclient.client_pause(1500)
    await world.keyring.revoke_key(k["id"])  # the NOTIFY arrives; the Redis part times out
    await asyncio.sleep(1.8)  # Redis answers again; the flusher retries
    fresh = await aiohttp_client(create_app(cfg))
    r = await fresh.get("/auth/nginx", headers=nginx_headers(k["key"]))
    assert (r.status, r.headers["X-Auth-Error"]) == (401, "revoked_api_key")
    assert int(await rclient.get(f"gw:gen:{{{k['id']}}}") or 0) >= 1


async def test_an_unreadable_redis_entry_is_a_miss(client: Client, world: World, rclient: aioredis.Redis) -> None:
    k = await world.key(orgs=[world.org_a])
    d = digest(PEPPER.encode(), k["key"])
    await rclient.set(C.REDIS_KEY_ENTRY.format(key_id=k["id"], digest=d), b"{not json")
    r = await client.get("/auth/nginx", headers=nginx_headers(k["key"]))
    assert r.status == 200  # read from Postgres instead, and the entry rewritten
