"""`database.replica_url` against a real streaming replica (pg_basebackup -R): lookups go to the standby,
replica lag never brings back what a change took away, and a standby that is down costs nothing but its
reads (they go to the primary)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from gateway.app import create_app
from gateway.config import Config
from gateway.data.db import Database
from gateway.data.schema import migrate
from gateway.directory import Directory
from gateway.keyring import Keyring
from gateway.keys import KeyFormat, SecretHasher
from gateway.typedefs import LISTENER, METRICS, STORE, VERIFIER
from tests._topologies import PostgresStreamingReplica, postgres_replica
from tests.conftest import Services, World, make_config, nginx_headers, until

pytestmark = pytest.mark.topology

# Each test names pg_pair first: fixtures are torn down in reverse, so the gateway stops before its Postgres.


@pytest.fixture
async def pg_pair(services: Services, clean: None) -> AsyncIterator[PostgresStreamingReplica]:
    with postgres_replica() as topo:
        conn = await asyncpg.connect(topo.primary_url)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        yield topo


@pytest.fixture
async def replica_world(services: Services, pg_pair: PostgresStreamingReplica) -> AsyncIterator[World]:
    cfg = make_config_for(services, pg_pair)
    pool = await asyncpg.create_pool(pg_pair.primary_url, min_size=1, max_size=4)
    hasher = SecretHasher(cfg.keys.argon2, 2)
    try:
        w = World(
            Keyring(Database(pool), KeyFormat(cfg.keys.prefix), hasher, cfg.roles), Directory(Database(pool), cfg.roles)
        )
        w.org_a = (await w.directory.create_org("A"))["id"]
        w.org_b = (await w.directory.create_org("B"))["id"]
        w.user = (await w.directory.create_user("owner@example.com"))["id"]
        await w.directory.set_member(w.org_a, w.user, "admin")
        yield w
    finally:
        hasher.close()
        await pool.close()


def make_config_for(services: Services, topo: PostgresStreamingReplica, **cache: Any) -> Config:
    return make_config(
        services,
        database={"url": topo.primary_url, "replica_url": topo.replica_url, "timeout_ms": 500},
        cache={"local_ttl_s": 0.05, **cache},  # entries soon need a lookup again
    )


async def _verify(c: Any, key: str, org: str) -> tuple[int, str]:
    r = await c.get("/auth/nginx", headers=nginx_headers(key, **{"X-Org-Id": org}))
    return r.status, r.headers.get("X-Auth-Error", "")


async def _changed(c: Any, change: Any) -> None:
    """Make a change on the primary and wait until its NOTIFY has reached the gateway."""
    invalidations = c.app[METRICS].invalidations
    seen = invalidations._value.get()
    floor = c.app[STORE].floor
    await change
    await until(lambda: invalidations._value.get() != seen or c.app[STORE].floor != floor)


async def test_lookups_go_to_the_replica_and_lag_never_resurrects_a_revoked_key(
    pg_pair: PostgresStreamingReplica, replica_world: World, aiohttp_client: Any, services: Services, rclient: Any
) -> None:
    w = replica_world
    c = await aiohttp_client(create_app(make_config_for(services, pg_pair, redis_ttl_s=0.05)))
    store = c.app[STORE]
    await until(lambda: c.app[LISTENER].connected and store.floor is not None)
    k = await w.key("replica", orgs=[w.org_a])
    pg_pair.wait_caught_up()
    assert await _verify(c, k["key"], w.org_a) == (200, "")
    assert store.replica_reads > 0  # the key (and its owner's memberships) came from the standby
    # ...and stayed in this process: another one, told of a change before this one, could take it for newer.
    assert await rclient.keys(f"gw:key:{{{k['id']}}}:*") == []

    pg_pair.pause_replay()  # the standby still receives the WAL, and shows none of it
    await _changed(c, w.keyring.revoke_key(k["id"]))
    pg_pair.wait_received()
    revoked = f"SELECT revoked_at IS NULL FROM api_keys WHERE id = '{k['id']}'"  # noqa: S608 - our own key id
    assert pg_pair.replica_sql(revoked) == "t"  # the standby still shows the key as active
    await asyncio.sleep(0.1)  # past every cache's freshness: the next request reads Postgres
    for _ in range(3):
        assert await _verify(c, k["key"], w.org_a) == (401, "revoked_api_key")

    # A key created while the standby lags: not on the standby, found on the primary.
    fresh = await w.key("fresh", orgs=[w.org_a])
    assert await _verify(c, fresh["key"], w.org_a) == (200, "")

    # A membership taken away while the standby lags: the key no longer acts in that org.
    await _changed(c, w.directory.remove_member(w.org_a, w.user))
    await asyncio.sleep(0.1)
    status, _ = await _verify(c, fresh["key"], w.org_a)
    assert status in (401, 403)

    pg_pair.resume_replay()
    pg_pair.wait_caught_up()
    reads = store.replica_reads
    await w.directory.set_member(w.org_b, w.user, "viewer")
    other = await w.key("other", role="viewer", orgs=[w.org_b])
    pg_pair.wait_caught_up()
    await asyncio.sleep(0.1)
    assert (await _verify(c, other["key"], w.org_b))[0] == 200
    assert store.replica_reads > reads  # caught up: the standby serves again


async def test_a_stopped_replica_falls_back_to_the_primary(
    pg_pair: PostgresStreamingReplica, replica_world: World, aiohttp_client: Any, services: Services
) -> None:
    w = replica_world
    c = await aiohttp_client(create_app(make_config_for(services, pg_pair, redis_ttl_s=0.05)))
    store = c.app[STORE]
    await until(lambda: c.app[LISTENER].connected and store.floor is not None)
    pg_pair.stop_replica()
    keys = [await w.key(f"k{i}", orgs=[w.org_a]) for i in range(3)]
    for k in keys:  # each one a cache miss, with the standby down
        assert await _verify(c, k["key"], w.org_a) == (200, "")
    assert store.replica is not None
    checks = (await (await c.get("/readyz")).json())["checks"]
    assert checks["postgres"] == "ok" and checks["postgres_replica"] == "unavailable"
    await w.keyring.revoke_key(keys[0]["id"])
    await asyncio.sleep(0.1)
    assert await _verify(c, keys[0]["key"], w.org_a) == (401, "revoked_api_key")

    pg_pair.start_replica()
    pg_pair.wait_caught_up()
    await until(lambda: store.replica is not None and store.replica.breaker.available, timeout_s=10)
    reads = store.replica_reads
    late = await w.key("late", orgs=[w.org_a])
    pg_pair.wait_caught_up()
    assert await _verify(c, late["key"], w.org_a) == (200, "")
    assert store.replica_reads > reads


async def test_a_replica_that_is_down_at_start_up_does_not_stop_the_gateway(
    pg_pair: PostgresStreamingReplica, replica_world: World, aiohttp_client: Any, services: Services
) -> None:
    pg_pair.stop_replica()
    c = await aiohttp_client(create_app(make_config_for(services, pg_pair)))
    assert (await c.get("/readyz")).status == 200
    k = await replica_world.key("cold", orgs=[replica_world.org_a])
    assert await _verify(c, k["key"], replica_world.org_a) == (200, "")


async def test_a_primary_position_that_cannot_be_read_costs_no_notification(
    pg_pair: PostgresStreamingReplica, replica_world: World, aiohttp_client: Any, services: Services
) -> None:
    """The listener read the primary's WAL position before acting on a notification, and on connecting: a
    read that failed (here: the gateway's role may not call the function) lost the notification, and the
    listener never came up at all. Now the notification is applied and the position stays unknown, so
    every lookup goes to the primary."""
    role = "gw_limited"
    pg_pair.primary_sql(
        f"CREATE ROLE {role} LOGIN; GRANT ALL ON ALL TABLES IN SCHEMA public TO {role};"
        f" GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role};"
        " REVOKE EXECUTE ON FUNCTION pg_current_wal_insert_lsn() FROM PUBLIC"
    )
    limited = pg_pair.primary_url.replace("postgres@", f"{role}@", 1)
    cfg = make_config(
        services,
        database={"url": limited, "replica_url": pg_pair.replica_url.replace("postgres@", f"{role}@", 1)},
        cache={"local_ttl_s": 0.05},
    )
    w = replica_world
    c = await aiohttp_client(create_app(cfg))
    await until(lambda: c.app[LISTENER].connected)
    k = await w.key("limited", orgs=[w.org_a])
    assert await _verify(c, k["key"], w.org_a) == (200, "")
    invalidations = c.app[METRICS].invalidations
    seen = invalidations._value.get()
    await w.keyring.revoke_key(k["id"])
    await until(lambda: invalidations._value.get() != seen)  # the notification was applied
    assert await _verify(c, k["key"], w.org_a) == (401, "revoked_api_key")
    assert c.app[STORE].floor is None and c.app[STORE].replica_reads == 0  # no position: no replica reads


async def test_reads_that_must_see_their_own_writes_go_to_the_primary(
    pg_pair: PostgresStreamingReplica, replica_world: World, aiohttp_client: Any, services: Services
) -> None:
    """Issuing a session or a token checks the membership `current`, as just written: with the standby
    behind, that read must still see it."""
    w = replica_world
    c = await aiohttp_client(create_app(make_config_for(services, pg_pair)))
    await until(lambda: c.app[LISTENER].connected and c.app[STORE].floor is not None)
    store = c.app[STORE]
    pg_pair.wait_caught_up()  # the standby has replayed past the floor: it would be asked
    floor = store.floor
    pg_pair.pause_replay()
    await w.directory.set_member(w.org_b, w.user, "viewer")
    store.floor = floor  # as on a process not told of the change yet (made through another replica)
    reads = store.replica_reads
    assert (await c.app[VERIFIER].memberships(w.user, current=True)).get(w.org_b) == "viewer"
    assert store.replica_reads == reads
    pg_pair.resume_replay()
