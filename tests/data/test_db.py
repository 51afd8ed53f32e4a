"""The management layer's use of Postgres (`Database.connect`, gateway/data/db.py): bounded, an outage is
a 503, and each change reports what it invalidated."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import pytest

from gateway.app import create_app
from gateway.audit import CLI
from gateway.backends import StoreUnavailable
from gateway.config import Config, RolesConfig
from gateway.data.db import Database
from gateway.directory import Directory
from gateway.keyring import Keyring
from gateway.keys import KeyFormat, SecretHasher
from tests._faultproxy import FaultProxy
from tests.conftest import Services, World, make_config


async def test_a_hung_database_is_a_bounded_503_and_the_pool_recovers(
    aiohttp_client: Any, services: Services, clean: None, world: World
) -> None:
    """Issue 11: management calls took pool connections with no deadline and no error mapping, so a
    Postgres that stopped answering held the call (and its connection) until the client gave up. Now the
    call answers 503 auth_unavailable once `database.management_timeout_ms` has passed, the connection is
    closed instead of rolled back, and the next calls work as soon as Postgres answers again."""
    with FaultProxy(services.pg.port) as proxy:
        url = f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres"
        cfg = make_config(services, database={"url": url, "timeout_ms": 300, "management_timeout_ms": 600})
        c = await aiohttp_client(create_app(cfg))
        k = await world.key(orgs=[world.org_a])
        headers = {"Authorization": f"Bearer {k['key']}"}
        members = f"/v1/orgs/{world.org_a}/members"
        assert (await c.get(members, headers=headers)).status == 200  # the key is cached from here on
        new_key = {"name": "x", "role": "viewer", "orgs": [world.org_a]}
        proxy.hang()
        for method, path, body in (("GET", members, None), ("POST", "/v1/keys", new_key)):
            started = time.monotonic()
            r = await asyncio.wait_for(c.request(method, path, json=body, headers=headers), timeout=10)
            took = time.monotonic() - started
            assert (r.status, r.headers["X-Auth-Error"]) == (503, "auth_unavailable"), await r.text()
            assert took < 5, took
        proxy.pass_()
        for _ in range(50):  # the breaker's probe, then connections anew
            r = await c.get(members, headers=headers)
            if r.status == 200:
                break
            await asyncio.sleep(0.1)
        assert r.status == 200
        r = await c.post("/v1/keys", json=new_key, headers=headers)
        assert r.status == 201, await r.text()


async def test_every_management_call_has_a_deadline(services: Services, clean: None, cfg: Config) -> None:
    """Issue 11: management calls took pool connections with no timeout or error mapping (unlike the hot path's
    `Store`): with Postgres hung after the connection was made, a read or a write waited for ever. Now both
    raise StoreUnavailable (503) after `timeout_s`, and the pool serves again once Postgres answers."""
    with FaultProxy(services.pg.port) as proxy:
        url = f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres"
        pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
        try:
            directory = Directory(Database(pool, timeout_s=0.5), RolesConfig())
            org = (await directory.create_org("A"))["id"]
            proxy.hang()
            for call in (directory.members(org), directory.create_org("B")):
                started = time.monotonic()
                with pytest.raises(StoreUnavailable):
                    await asyncio.wait_for(call, timeout=5)
                assert time.monotonic() - started < 2
            proxy.pass_()
            assert await directory.members(org) == []
            assert (await directory.create_org("C"))["name"] == "C"
        finally:
            await pool.close()


async def test_each_call_reports_what_it_invalidated(cfg: Config, pool: asyncpg.Pool, world: World) -> None:
    """Issue 11: `Admin.invalidated` held the key ids of "the last call" on an object that serves
    concurrent calls, so one call's list could be another's. Each change now hands its own ids to the
    caller's `on_invalidate` (the CLI drops them from Redis): two changes at once report both."""
    k1 = await world.key(name="one", orgs=[world.org_a])
    k2 = await world.key(name="two", orgs=[world.org_a])
    got: list[list[str]] = []
    hasher = SecretHasher(cfg.keys.argon2, 1)
    try:
        db = Database(pool, on_invalidate=got.append)
        keyring, directory = Keyring(db, KeyFormat("gw"), hasher, cfg.roles), Directory(db, cfg.roles)
        await asyncio.gather(keyring.revoke_key(k1["id"], CLI), directory.set_member(world.org_b, world.user, "member"))
    finally:
        hasher.close()
    assert [k1["id"]] in got
    assert sorted(k2["id"] in ids and k1["id"] in ids for ids in got) == [False, True]  # all the user's keys


async def test_a_wrong_query_is_a_bug_not_an_outage(pool: asyncpg.Pool) -> None:
    """A call of ours that asyncpg refuses (an argument of the wrong type) raises as it is, to be answered
    500 with a request id, not mapped to StoreUnavailable (503); the pool serves on."""
    db = Database(pool, timeout_s=2)
    with pytest.raises(asyncpg.exceptions.DataError):  # raised by asyncpg itself, before sending
        async with db.connect(transaction=True) as conn:
            await conn.fetchval("SELECT $1::int", "not a number")
    async with db.connect() as conn:
        assert await conn.fetchval("SELECT 1") == 1
