"""The sessions the web page signs in to (gateway/sessions.py): CSRF on writes, ended by the key's
revocation, bounded per user, never outliving their time."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from gateway.app import create_app
from tests.conftest import Client, Services, World, make_config
from tests.test_ui import sign_in


async def test_writes_need_the_csrf_token(client: Client, world: World) -> None:
    k = await world.key()
    session = await (await sign_in(client, k["key"])).json()
    r = await client.post("/v1/keys", json={"name": "x", "role": "viewer"})
    assert (r.status, (await r.json())["error"]["code"]) == (400, "invalid_request")
    r = await client.post("/v1/keys", json={"name": "x", "role": "viewer"}, headers={"X-CSRF-Token": "wrong"})
    assert r.status == 400
    r = await client.post("/v1/keys", json={"name": "x", "role": "viewer"}, headers={"X-CSRF-Token": session["csrf"]})
    assert r.status == 201
    assert (await client.get("/v1/me")).status == 200  # reads need no token


async def test_revoking_the_key_ends_its_sessions(client: Client, world: World) -> None:
    k = await world.key()
    await sign_in(client, k["key"])
    assert (await client.get("/ui/session")).status == 200
    await world.keyring.revoke_key(k["id"])
    r = await client.get("/ui/session")
    assert (r.status, (await r.json())["error"]["code"]) == (401, "revoked_api_key")


async def test_a_user_holds_a_bounded_number_of_sessions(
    aiohttp_client: Any, services: Services, world: World, rclient: aioredis.Redis
) -> None:
    """Before, the user's session set in Redis grew without bound. Beyond the cap, the oldest end."""
    c = await aiohttp_client(create_app(make_config(services, ui={"max_sessions_per_user": 2})))
    k = await world.key()
    cookies = []
    for _ in range(4):
        r = await sign_in(c, k["key"])
        assert r.status == 200
        cookies.append(r.cookies["gw_session"].value)
        await asyncio.sleep(0.01)

    async def status(cookie: str) -> int:
        async with (
            aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as other,
            other.get(c.make_url("/ui/session"), headers={"Cookie": f"gw_session={cookie}"}) as r,
        ):
            return r.status

    assert [await status(cookie) for cookie in cookies] == [204, 204, 200, 200]
    assert await rclient.zcard(f"gw:usessz:{world.user}") == 2
    assert len(await rclient.keys("gw:sess:*")) == 2


async def test_a_session_never_outlives_its_time(
    aiohttp_client: Any, services: Services, world: World, rclient: aioredis.Redis
) -> None:
    """Found by review: switching org saved the session with a fresh expiry, so a busy session lived for
    ever (and, its sign-in aged out of the user's set, escaped sign-out and the cap)."""
    c = await aiohttp_client(create_app(make_config(services, ui={"session_ttl_s": 60})))
    k = await world.key()
    session = await (await sign_in(c, k["key"])).json()
    (name,) = await rclient.keys("gw:sess:*")
    # As if signed in 50 s ago: switching org keeps the 10 s it has left.
    stored = json.loads(await rclient.get(name) or "{}")
    await rclient.set(name, json.dumps({**stored, "created": stored["created"] - 50}), ex=10)
    r = await c.post("/ui/session/org", json={"org": world.org_b}, headers={"X-CSRF-Token": session["csrf"]})
    assert r.status == 200
    assert 0 < await rclient.ttl(name) <= 10
    # Past its time it is over, even if Redis still holds it.
    stored = json.loads(await rclient.get(name) or "{}")
    await rclient.set(name, json.dumps({**stored, "created": stored["created"] - 11}), ex=30)
    assert (await c.get("/ui/session")).status == 204
    assert (await c.get("/v1/me")).status == 401
