"""The invalidation listener: it outlives every failure of its connection, and while it is down the
in-process cache is not trusted as fresh."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from gateway import constants as C
from gateway.app import create_app
from gateway.cache import Entry, LocalCache
from gateway.listener import InvalidationListener, supervise
from gateway.typedefs import LISTENER
from tests._faultproxy import FaultProxy
from tests.conftest import Services, World, make_config, nginx_headers, until


async def _notify(url: str, key_ids: list[str]) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SELECT pg_notify($1, $2)", C.PG_INVALIDATION_CHANNEL, json.dumps({"k": key_ids}))
    finally:
        await conn.close()


async def _terminate_listeners(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'gateway-listener'"
        )
        return len(rows)
    finally:
        await conn.close()


@pytest.fixture
async def running(services: Services, clean: None) -> AsyncIterator[Callable[..., Awaitable[InvalidationListener]]]:
    tasks: list[asyncio.Task[None]] = []

    async def start(
        on_keys: Callable[[list[str]], Awaitable[None]], dsn: str | None = None, local: LocalCache | None = None
    ) -> InvalidationListener:
        cache = local if local is not None else LocalCache(10, 30, 10)
        listener = InvalidationListener(dsn or services.pg.url, cache, on_keys, 0.5, 0.1)
        tasks.append(asyncio.create_task(supervise("listener", listener.run)))
        await until(lambda: listener.connected)
        return listener

    yield start
    for t in tasks:
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t


async def test_an_error_in_an_odd_state_is_logged_and_the_listener_carries_on(
    running: Callable[..., Awaitable[InvalidationListener]], services: Services, caplog: pytest.LogCaptureFixture
) -> None:
    """Seen in an outage: asyncpg's InternalClientError ("cannot switch to state 12; another operation
    is in progress") ended the task silently, and the process stopped hearing revocations."""
    received: list[list[str]] = []

    async def on_keys(key_ids: list[str]) -> None:
        if not received:
            received.append([])
            raise asyncpg.exceptions.InternalClientError("cannot switch to state 12; another operation is in progress")
        received.append(key_ids)

    local = LocalCache(10, 30, 10)
    caplog.set_level(logging.WARNING, "gateway.listener")
    listener = await running(on_keys, local=local)
    await _notify(services.pg.url, ["k1"])
    await until(lambda: listener.reconnects == 1 and listener.connected)
    assert "InternalClientError" in caplog.text
    await _notify(services.pg.url, ["k2"])
    await until(lambda: ["k2"] in received)


async def test_its_connection_killed_mid_traffic_comes_back(
    running: Callable[..., Awaitable[InvalidationListener]], services: Services
) -> None:
    received: list[str] = []

    async def on_keys(key_ids: list[str]) -> None:
        received.extend(key_ids)

    listener = await running(on_keys)
    for round_ in range(3):  # killed while idle, while pinging, while notifications arrive
        burst = asyncio.gather(*(_notify(services.pg.url, [f"r{round_}n{i}"]) for i in range(5)))
        await asyncio.sleep(0.01 * round_)
        assert await _terminate_listeners(services.pg.url) == 1
        await burst
        expected = round_ + 1
        await until(lambda: listener.reconnects == expected and listener.connected)  # noqa: B023
    await _notify(services.pg.url, ["after"])
    await until(lambda: "after" in received)


async def test_while_it_is_down_the_local_cache_is_not_fresh(
    running: Callable[..., Awaitable[InvalidationListener]], services: Services
) -> None:
    proxy = FaultProxy(services.pg.port)
    proxy.start()
    try:
        local = LocalCache(10, 30, 10)

        async def on_keys(_key_ids: list[str]) -> None:
            return None

        listener = await running(on_keys, dsn=f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres", local=local)
        entry = Entry(_record(), time.time())
        local.put("d", entry, local.epoch)
        assert local.fresh(entry)
        proxy.hang()  # its pings go unanswered: it gives the connection up
        await until(lambda: not listener.connected, timeout_s=3)
        assert not local.fresh(entry)
        proxy.pass_()
        await until(lambda: listener.connected, timeout_s=5)
        # Notifications may have been lost meanwhile: what was read before is read again before use.
        assert not local.trusts(entry) and not local.fresh(entry)
    finally:
        proxy.close()


async def test_a_revocation_after_the_listener_was_killed_reaches_the_process(
    aiohttp_client: Any, services: Services, world: World
) -> None:
    c = await aiohttp_client(create_app(make_config(services)))
    listener = c.app[LISTENER]
    await until(lambda: listener.connected)
    k = await world.key(orgs=[world.org_a])
    assert (await c.get("/auth/nginx", headers=nginx_headers(k["key"]))).status == 200
    assert await _terminate_listeners(services.pg.url) == 1
    await world.keyring.revoke_key(k["id"])
    started = time.monotonic()
    while (await c.get("/auth/nginx", headers=nginx_headers(k["key"]))).status == 200:
        assert time.monotonic() - started < 1.0, "the revocation took over a second"
        await asyncio.sleep(0.01)
    r = await c.get("/auth/nginx", headers=nginx_headers(k["key"]))
    assert (r.status, r.headers["X-Auth-Error"]) == (401, "revoked_api_key")


async def test_supervise_restarts_a_task_that_dies(caplog: pytest.LogCaptureFixture) -> None:
    runs = 0

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise RuntimeError("a bug")
        if runs == 2:
            return
        await asyncio.sleep(10)

    task = asyncio.create_task(supervise("flaky", flaky, restart_delay_s=0.01))
    await until(lambda: runs == 3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert "flaky crashed" in caplog.text and "flaky stopped" in caplog.text


def _record() -> Any:
    from gateway.models import KeyRecord

    return KeyRecord(
        id="k",
        user_id="u",
        name="n",
        role="admin",
        env="live",
        scopes=None,
        all_orgs=True,
        org_ids=(),
        all_projects=True,
        project_ids=(),
        allowed_cidrs=None,
        rate_limit=None,
        expires_at=None,
        revoked_at=None,
        memberships={},
    )
