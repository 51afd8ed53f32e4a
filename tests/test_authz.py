from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from gateway import constants as C
from gateway.app import create_app
from gateway.authz import effective_permissions, granted, pattern_matches
from gateway.config import Argon2Config
from gateway.data.db import Database
from gateway.keyring import Keyring, KeySpec
from gateway.keys import KeyFormat, SecretHasher
from gateway.listener import InvalidationListener
from gateway.typedefs import HASHER, LISTENER, METRICS, RESOLVER
from tests._faultproxy import FaultProxy
from tests.conftest import Client, Services, World, make_config, nginx_headers, poll, until


@pytest.mark.parametrize(
    ("pattern", "perm", "ok"),
    [
        ("*", "calls:read", True),
        ("*:read", "calls:read", True),
        ("*:read", "calls:write", False),
        ("calls:*", "calls:delete", True),
        ("calls:read", "calls:read", True),
        ("calls:read", "calls:read:extra", False),
        ("calls", "calls:read", False),
    ],
)
def test_pattern_matching(pattern: str, perm: str, ok: bool) -> None:
    assert pattern_matches(pattern, perm) is ok


def test_effective_permissions_intersect_role_and_scopes() -> None:
    assert effective_permissions(("*",), None) == ("*",)
    assert effective_permissions(("*:read",), ("calls:*",)) == ("calls:read",)
    assert effective_permissions(("*:read", "*:write"), ("calls:read", "projects:*")) == (
        "calls:read",
        "projects:read",
        "projects:write",
    )
    assert effective_permissions(("*:read",), ("billing:write",)) == ()
    assert effective_permissions(("*",), ("calls:read", "*:read")) == ("*:read",)
    assert granted(("calls:read",), "calls:read") and not granted((), "calls:read")


async def test_concurrent_verifications_of_one_key_share_one_argon2(client: Client, world: World) -> None:
    k = await world.key(orgs=[world.org_a])
    rs = await asyncio.gather(*(client.get("/auth/nginx", headers=nginx_headers(k["key"])) for _ in range(20)))
    assert [r.status for r in rs] == [200] * 20
    metrics = client.app[METRICS]
    assert metrics.argon2._value.get() == 1


async def test_wrong_secrets_are_negatively_cached(client: Client, world: World) -> None:
    from gateway.keys import KeyFormat

    k = await world.key(orgs=[world.org_a])
    fmt = KeyFormat("gw")
    wrong = fmt.build("live", k["id"], fmt.generate("live")[0].split("_")[3][:43])
    for _ in range(5):
        r = await client.get("/auth/nginx", headers=nginx_headers(wrong))
        assert r.headers["X-Auth-Error"] == "invalid_api_key"
    assert client.app[METRICS].argon2._value.get() == 1


# --- stale-while-revalidate ------------------------------------------------------------------------


@pytest.fixture
def slow_pg(services: Services, clean: None) -> Iterator[FaultProxy]:
    proxy = FaultProxy(services.pg.port)
    proxy.start()
    yield proxy
    proxy.close()


async def test_a_cached_key_past_its_fresh_time_is_answered_at_once(
    aiohttp_client: Any, services: Services, world: World, slow_pg: FaultProxy
) -> None:
    """Postgres answers after 1.5 s (timeout 0.5 s): a cached key due for revalidation is answered from
    the cache at once while a background load revalidates it. Before, the request waited for Postgres."""
    cfg = make_config(
        services,
        database={"url": f"postgresql://postgres@127.0.0.1:{slow_pg.port}/postgres", "timeout_ms": 500},
        cache={"local_ttl_s": 0.2, "redis_ttl_s": 0.2},  # Redis cannot answer for it either: Postgres must
    )
    c = await aiohttp_client(create_app(cfg))
    k = await world.key(orgs=[world.org_a])
    assert (await c.get("/auth/nginx", headers=nginx_headers(k["key"]))).status == 200
    await asyncio.sleep(0.3)  # past both fresh times
    slow_pg.slow(1500)
    worst = 0.0
    for _ in range(20):
        started = time.monotonic()
        r = await c.get("/auth/nginx", headers=nginx_headers(k["key"]))
        worst = max(worst, time.monotonic() - started)
        assert r.status == 200
        await asyncio.sleep(0.05)
    assert worst < 0.25, f"a cached key waited {worst:.2f}s on Postgres"
    text = await (await c.get("/metrics")).text()
    assert 'gateway_key_cache_total{tier="local_stale"}' in text


async def test_revocation_and_expiry_still_apply_at_once_to_a_stale_entry(
    aiohttp_client: Any, services: Services, world: World
) -> None:
    cfg = make_config(services, cache={"local_ttl_s": 0.1})
    c = await aiohttp_client(create_app(cfg))
    await poll(lambda: c.get("/readyz"), lambda r: r.status == 200)
    await _until_listening(c)
    expiring = await world.key(name="soon", orgs=[world.org_a], expires_at=_iso_in(1.0))
    revoked = await world.key(name="gone", orgs=[world.org_a])
    for k in (expiring, revoked):
        assert (await c.get("/auth/nginx", headers=nginx_headers(k["key"]))).status == 200
    await asyncio.sleep(0.2)  # both entries are now stale in the in-process cache
    await world.keyring.revoke_key(revoked["id"])
    r = await poll(lambda: c.get("/auth/nginx", headers=nginx_headers(revoked["key"])), lambda r: r.status != 200)
    assert r.headers["X-Auth-Error"] == "revoked_api_key"
    await asyncio.sleep(1.0)
    r = await c.get("/auth/nginx", headers=nginx_headers(expiring["key"]))
    assert (r.status, r.headers["X-Auth-Error"]) == (401, "expired_api_key")


def _iso_in(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


# --- loads under way and invalidations ---------------------------------------------------------


async def _slow_key(world: World, memory_kib: int, time_cost: int) -> dict[str, Any]:
    """A key whose argon2 check takes a while (real argon2, heavier parameters), so a load stays in flight."""
    hasher = SecretHasher(Argon2Config(memory_kib=memory_kib, time_cost=time_cost, parallelism=1), 1)
    try:
        keyring = Keyring(Database(world.pool), KeyFormat("gw"), hasher, world.keyring.roles)
        return await keyring.create_key(
            KeySpec(user_id=world.user, name="slow", role="admin", orgs=[world.org_a], projects=[], scopes=None)
        )
    finally:
        hasher.close()


async def _terminate_listener(services: Services) -> None:
    conn = await asyncpg.connect(services.pg.url)
    try:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'gateway-listener'"
        )
    finally:
        await conn.close()


async def test_a_request_after_a_revocation_never_joins_a_load_that_read_the_key_before(
    aiohttp_client: Any, services: Services, world: World
) -> None:
    c = await aiohttp_client(create_app(make_config(services)))
    await _until_listening(c)
    k = await _slow_key(world, 65536, 4)  # ~0.2 s of argon2 per check
    first = asyncio.ensure_future(c.get("/auth/nginx", headers=nginx_headers(k["key"])))
    await until(lambda: c.app[HASHER].admitted > 0)  # the load has read the key and is checking its secret
    invalidations = c.app[METRICS].invalidations
    seen = invalidations._value.get()
    await world.keyring.revoke_key(k["id"])
    await until(lambda: invalidations._value.get() != seen)  # the NOTIFY has reached this process
    second = await c.get("/auth/nginx", headers=nginx_headers(k["key"]))
    assert (second.status, second.headers["X-Auth-Error"]) == (401, "revoked_api_key")
    assert (await first).status == 200  # it was asked before the revocation


async def test_a_revocation_lost_in_a_listener_gap_is_not_undone_by_a_load_that_ends_after_it(
    aiohttp_client: Any, services: Services, world: World
) -> None:
    """A load reads the key, the listener's connection drops, the key is revoked (the NOTIFY is lost and
    nobody bumps the Redis generation), the listener comes back, then the load ends and fills Redis. That
    entry was read before the gap ended, so it must not be trusted."""
    c = await aiohttp_client(create_app(make_config(services)))
    listener = await _until_listening(c)
    k = await _slow_key(world, 131072, 8)  # ~0.8 s of argon2: longer than the gap
    first = asyncio.ensure_future(c.get("/auth/nginx", headers=nginx_headers(k["key"])))
    await until(lambda: c.app[HASHER].admitted > 0)  # the load has read the key and is checking its secret
    await _terminate_listener(services)
    await asyncio.sleep(0.05)
    await world.keyring.revoke_key(k["id"])
    await until(lambda: listener.reconnects > 0)
    assert (await first).status == 200  # asked before the revocation, and it ended after the gap
    for _ in range(5):
        r = await c.get("/auth/nginx", headers=nginx_headers(k["key"]))
        assert (r.status, r.headers["X-Auth-Error"]) == (401, "revoked_api_key")


async def test_after_a_listener_gap_cached_keys_are_still_answered_at_once(
    aiohttp_client: Any, services: Services, world: World, slow_pg: FaultProxy
) -> None:
    cfg = make_config(
        services, database={"url": f"postgresql://postgres@127.0.0.1:{slow_pg.port}/postgres", "timeout_ms": 500}
    )
    c = await aiohttp_client(create_app(cfg))
    listener = await _until_listening(c)
    k = await world.key(orgs=[world.org_a])
    assert (await c.get("/auth/nginx", headers=nginx_headers(k["key"]))).status == 200
    await _terminate_listener(services)
    await until(lambda: listener.reconnects > 0 and listener.connected)
    slow_pg.slow(1500)  # now Postgres is slow: the entry, read before the gap, is revalidated in the background
    started = time.monotonic()
    assert (await c.get("/auth/nginx", headers=nginx_headers(k["key"]))).status == 200
    assert time.monotonic() - started < 0.25


async def _until_listening(c: Any) -> InvalidationListener:
    listener: InvalidationListener = c.app[LISTENER]
    await until(lambda: listener.connected)
    return listener


async def test_a_revocation_redis_lost_does_not_bring_the_key_back(
    aiohttp_client: Any, services: Services, world: World, rclient: Any
) -> None:
    """Redis acknowledged the invalidation and then lost it (a Sentinel failover to a replica it had not
    reached yet, a restart from an older snapshot): its entry and generation are as before the revocation.
    This process was told of the revocation by Postgres, so it must not take the entry from Redis."""
    cfg = make_config(services, cache={"local_ttl_s": 0.05})  # the local entry soon needs Redis again
    c = await aiohttp_client(create_app(cfg))
    await _until_listening(c)
    k = await world.key("lost", orgs=[world.org_a])
    assert (await c.get("/auth/nginx", headers=nginx_headers(k["key"]))).status == 200
    before = {key: await rclient.dump(key) for key in await rclient.keys(f"gw:*{{{k['id']}}}*")}
    assert not any(b":gen:" in key for key in before)  # never invalidated yet: no generation counter
    assert any(b":key:" in key for key in before)  # the key's entry is in Redis
    await asyncio.sleep(C.CLOCK_SKEW_S + 0.1)  # the entry is older than the allowed skew: only the gate stops it
    invalidations = c.app[METRICS].invalidations
    seen = invalidations._value.get()
    await world.keyring.revoke_key(k["id"])
    await until(lambda: invalidations._value.get() != seen)
    await until(lambda: not c.app[RESOLVER].pending_invalidations)  # applied to Redis...
    pattern = f"gw:*{{{k['id']}}}*"
    await rclient.delete(*await rclient.keys(pattern))  # ...and lost there: Redis is as it was before
    for key, value in before.items():
        await rclient.restore(key, 0, value)
    await asyncio.sleep(0.1)  # past local_ttl_s
    r = await c.get("/auth/nginx", headers=nginx_headers(k["key"]))
    assert (r.status, r.headers["X-Auth-Error"]) == (401, "revoked_api_key")


async def test_a_process_started_after_a_revocation_redis_lost_does_not_serve_the_key(
    aiohttp_client: Any, services: Services, world: World, rclient: Any
) -> None:
    """As above, for a process that started after the revocation (a new pod): it was never told of it, so
    nothing of that key could be set against the entry. A Redis entry read before the process started is
    read again from Postgres once."""
    cfg = make_config(services)
    first = await aiohttp_client(create_app(cfg))
    await _until_listening(first)
    k = await world.key("late", orgs=[world.org_a])
    assert (await first.get("/auth/nginx", headers=nginx_headers(k["key"]))).status == 200
    pattern = f"gw:*{{{k['id']}}}*"
    before = {key: await rclient.dump(key) for key in await rclient.keys(pattern)}
    invalidations = first.app[METRICS].invalidations
    seen = invalidations._value.get()
    await world.keyring.revoke_key(k["id"])
    await until(lambda: invalidations._value.get() != seen)
    await until(lambda: not first.app[RESOLVER].pending_invalidations)
    await rclient.delete(*await rclient.keys(pattern))  # lost by Redis
    for key, value in before.items():
        await rclient.restore(key, 0, value)
    later = await aiohttp_client(create_app(cfg))
    await _until_listening(later)
    r = await later.get("/auth/nginx", headers=nginx_headers(k["key"]))
    assert (r.status, r.headers["X-Auth-Error"]) == (401, "revoked_api_key")
