"""The sessions the web page signs in to (gateway/sessions.py): CSRF on writes, ended by the key's
revocation, bounded per user, never outliving their time."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from gateway._breaker import Breaker
from gateway._services import free_port
from gateway.app import create_app
from gateway.audit import CLI
from gateway.errors import AuthUnavailable
from gateway.sessions import SessionStore
from tests.conftest import Client, Services, World, make_config, nginx_headers
from tests.test_api import auth
from tests.test_ui import sign_in


async def test_writes_need_the_csrf_token(client: Client, world: World) -> None:
    k = await world.key()
    session = await (await sign_in(client, k["key"])).json()
    r = await client.post("/v1/keys", json={"name": "x", "role": "viewer"})
    assert (r.status, (await r.json())["error"]["code"]) == (403, "csrf_failed")
    r = await client.post("/v1/keys", json={"name": "x", "role": "viewer"}, headers={"X-CSRF-Token": "wrong"})
    assert r.status == 403
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
    c = await aiohttp_client(create_app(make_config(services, sessions={"max_per_user": 2})))
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
    assert len(await rclient.keys("gw:session:*")) == 2


async def test_a_session_never_outlives_its_time(
    aiohttp_client: Any, services: Services, world: World, rclient: aioredis.Redis
) -> None:
    """Found by review: switching org saved the session with a fresh expiry, so a busy session lived for
    ever (and, its sign-in aged out of the user's set, escaped sign-out and the cap)."""
    cfg = {"absolute_ttl_s": 60, "idle_ttl_s": 60, "touch_interval_s": 30}
    c = await aiohttp_client(create_app(make_config(services, sessions=cfg)))
    k = await world.key()
    session = await (await sign_in(c, k["key"])).json()
    (name,) = await rclient.keys("gw:session:*")
    # As if signed in 50 s ago: switching org keeps the 10 s it has left.
    created = float(await rclient.hget(name, "created") or 0)
    await rclient.hset(name, mapping={"created": repr(created - 50), "last_seen": repr(created)})
    await rclient.expire(name, 10)
    r = await c.post("/ui/session/org", json={"org": world.org_b}, headers={"X-CSRF-Token": session["csrf"]})
    assert r.status == 200
    assert 0 < await rclient.ttl(name) <= 10
    # Past its time it is over, even if Redis still holds it.
    await rclient.hset(name, "created", repr(created - 61))
    await rclient.expire(name, 30)
    assert (await c.get("/ui/session")).status == 204
    assert (await c.get("/v1/me")).status == 401


# --- sessions in forward auth (issue 12) ---------------------------------------------------------------


async def _service_key(world: World, org: str) -> dict[str, Any]:
    sa = await world.directory.create_service_account(org, "web", "admin", CLI)
    return await world.key(name="issuer", user=sa["id"], role="admin", orgs=[org])


async def _issue_session(c: Client, world: World, org: str, user: str | None = None) -> dict[str, Any]:
    issuer = await _service_key(world, org)
    r = await c.post("/v1/sessions", json={"user": user or world.user, "org": org}, headers=auth(issuer))
    assert r.status == 201, await r.text()
    issued: dict[str, Any] = await r.json()
    assert issued["cookie"]["http_only"] and issued["cookie"]["same_site"] == "Strict"
    return issued


def _cookie(issued: dict[str, Any], **extra: str) -> dict[str, str]:
    return {"Cookie": f"gw_session={issued['cookie']['value']}", **extra}


async def test_a_session_identifies_its_user_with_the_membership_role(client: Client, world: World) -> None:
    issued = await _issue_session(client, world, world.org_a)
    r = await client.get("/auth/nginx", headers=nginx_headers(**_cookie(issued)))
    assert r.status == 200, await r.text()
    assert (r.headers["X-Auth-Method"], r.headers["X-Org"], r.headers["X-Role"]) == ("session", world.org_a, "admin")
    assert (r.headers["X-User"], r.headers["X-Key-Id"]) == (world.user, "")
    # An org the user is not in: refused, never the session's org instead.
    elsewhere = (await world.directory.create_org("C"))["id"]
    r = await client.get("/auth/nginx", headers=nginx_headers(**_cookie(issued, **{"X-Org-Id": elsewhere})))
    assert (r.status, r.headers["X-Auth-Error"]) == (403, "org_not_allowed")
    # A role change applies on the next request.
    await world.directory.set_member(world.org_a, world.user, "member")
    await until_role(client, issued, "member")


async def test_a_service_accounts_session_stays_in_its_org_and_under_its_role(client: Client, world: World) -> None:
    """Found by review: a session an org's service account issued acted in every org of the user, as the
    user's full role (an admin of A could act as an owner in B, and mint an owner key there). It acts in
    the issuer's org only, and never above the issuer's role there."""
    await world.directory.set_member(world.org_a, world.user, "owner")
    await world.directory.set_member(world.org_b, world.user, "owner")
    issued = await _issue_session(client, world, world.org_a)  # the issuer is an admin of A
    r = await client.get("/auth/nginx", headers=nginx_headers(**_cookie(issued)))
    assert (r.status, r.headers["X-Role"]) == (200, "admin")
    r = await client.get("/auth/nginx", headers=nginx_headers(**_cookie(issued, **{"X-Org-Id": world.org_b})))
    assert (r.status, r.headers["X-Auth-Error"]) == (403, "org_not_allowed")
    body = {"name": "x", "role": "owner", "orgs": [world.org_b]}
    r = await client.post("/v1/keys", json=body, headers=_cookie(issued, **{"X-CSRF-Token": issued["csrf"]}))
    assert r.status in (403, 404)
    r = await client.post(
        "/v1/session/org", json={"org": world.org_b}, headers=_cookie(issued, **{"X-CSRF-Token": issued["csrf"]})
    )
    assert r.status == 400


async def until_role(client: Client, issued: dict[str, Any], role: str) -> None:
    deadline = asyncio.get_running_loop().time() + 1.0
    while True:
        r = await client.get("/auth/nginx", headers=nginx_headers(**_cookie(issued)))
        if r.headers.get("X-Role") == role:
            return
        assert asyncio.get_running_loop().time() < deadline, "the role change did not apply within a second"
        await asyncio.sleep(0.02)


async def test_unsafe_cookie_only_requests_need_an_allowed_origin(
    aiohttp_client: Any, services: Services, world: World
) -> None:
    cfg = make_config(services, sessions={"allowed_origins": ["https://app.example.com"]})
    c = await aiohttp_client(create_app(cfg))
    issued = await _issue_session(c, world, world.org_a)

    async def post(**extra: str) -> tuple[int, str]:
        r = await c.get("/auth/nginx", headers=nginx_headers(method="POST", **_cookie(issued, **extra)))
        return r.status, r.headers.get("X-Auth-Error", "")

    assert await post() == (403, "csrf_failed")
    assert await post(Origin="https://evil.example.com") == (403, "csrf_failed")
    assert await post(**{"Sec-Fetch-Site": "cross-site"}) == (403, "csrf_failed")
    assert await post(Origin="https://app.example.com") == (200, "")
    assert await post(**{"Sec-Fetch-Site": "same-origin"}) == (200, "")
    r = await c.get("/auth/nginx", headers=nginx_headers(method="GET", **_cookie(issued)))
    assert r.status == 200  # a safe method needs no origin
    # The cookie sent twice is ambiguous (one planted by a sibling domain): refused.
    twice = {"Cookie": f"gw_session={issued['cookie']['value']}; gw_session=x"}
    r = await c.get("/auth/nginx", headers=nginx_headers(**twice))
    assert (r.status, r.headers["X-Auth-Error"]) == (401, "invalid_request")


async def test_switching_org_and_ending_the_session(client: Client, world: World) -> None:
    k = await world.key(name="laptop", role="owner")  # all orgs: the web page's session switches among them
    signed_in = await sign_in(client, k["key"])
    issued = {"cookie": {"value": signed_in.cookies["gw_session"].value}, **(await signed_in.json())}
    client.session.cookie_jar.clear()  # the cookie is sent by hand below
    csrf = {"X-CSRF-Token": issued["csrf"]}
    r = await client.post("/v1/session/org", json={"org": world.org_b}, headers=_cookie(issued, **csrf))
    assert r.status == 200, await r.text()
    r = await client.get("/auth/nginx", headers=nginx_headers(**_cookie(issued)))
    assert (r.headers["X-Org"], r.headers["X-Role"]) == (world.org_b, "viewer")
    r = await client.post("/v1/session/org", json={"org": world.org_b}, headers=_cookie(issued))
    assert (r.status, r.headers["X-Auth-Error"]) == (403, "csrf_failed")
    assert (await client.delete("/v1/session", headers=_cookie(issued, **csrf))).status == 200
    r = await client.get("/auth/nginx", headers=nginx_headers(**_cookie(issued)))
    assert (r.status, r.headers["X-Auth-Error"]) == (401, "missing_credentials")
    types = [r["type"] for r in await world.pool.fetch("SELECT type FROM audit_events WHERE type LIKE 'session.%'")]
    assert types == ["session.created", "session.org_switched", "session.ended"]


async def test_only_a_service_account_of_the_org_issues_sessions(client: Client, world: World) -> None:
    person = await world.key(role="owner")
    r = await client.post("/v1/sessions", json={"user": world.user, "org": world.org_a}, headers=auth(person))
    assert r.status == 403
    issuer = await _service_key(world, world.org_a)
    stranger = (await world.directory.create_user("stranger@example.com"))["id"]
    r = await client.post("/v1/sessions", json={"user": stranger, "org": world.org_a}, headers=auth(issuer))
    assert r.status == 404  # not a member
    r = await client.post("/v1/sessions", json={"user": world.user, "org": world.org_b}, headers=auth(issuer))
    assert r.status == 403  # another org's


async def test_signing_out_everywhere_ends_sessions_and_tokens(client: Client, world: World) -> None:
    issued = await _issue_session(client, world, world.org_a)
    key = await world.key(role="admin")
    pair = await (await client.post("/v1/tokens", json={"org": world.org_a}, headers=auth(key))).json()
    assert (await client.delete("/v1/sessions", headers=auth(key))).status == 200
    r = await client.get("/auth/nginx", headers=nginx_headers(**_cookie(issued)))
    assert r.status == 401
    r = await client.get("/auth/nginx", headers=nginx_headers(pair["access_token"]))
    assert (r.status, r.headers["X-Auth-Error"]) == (401, "invalid_token")


async def test_no_redis_write_per_request(
    aiohttp_client: Any, services: Services, world: World, rclient: aioredis.Redis
) -> None:
    """Last-seen is written at most once per `sessions.touch_interval_s`, in the background."""
    cfg = make_config(services, sessions={"touch_interval_s": 1, "idle_ttl_s": 60})
    c = await aiohttp_client(create_app(cfg))
    issued = await _issue_session(c, world, world.org_a)
    (name,) = await rclient.keys("gw:session:*")

    async def hsets() -> int:
        return int((await rclient.info("commandstats")).get("cmdstat_hset", {}).get("calls", 0))

    seen, before = await rclient.hget(name, "last_seen"), await hsets()
    for _ in range(20):
        assert (await c.get("/auth/nginx", headers=nginx_headers(**_cookie(issued)))).status == 200
    assert (await rclient.hget(name, "last_seen"), await hsets()) == (seen, before)
    await asyncio.sleep(1.1)
    for _ in range(5):
        assert (await c.get("/auth/nginx", headers=nginx_headers(**_cookie(issued)))).status == 200
    await until_async(lambda: rclient.hget(name, "last_seen"), seen)


async def until_async(read: Any, old: Any) -> None:
    """Poll `read()` until it differs from `old` (a background write landed)."""
    for _ in range(100):
        if await read() != old:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("no background write")


async def test_a_cookie_or_csrf_token_that_is_not_utf8_is_no_500(client: Client, world: World) -> None:
    """Found by review: aiohttp hands undecodable header bytes on as lone surrogates; hashing the cookie
    (or comparing the CSRF token) raised, a 500."""
    issued = await _issue_session(client, world, world.org_a)
    for target, extra in (
        ("/auth/nginx", b"X-Original-Method: GET\r\nX-Original-URI: /v1/things\r\nCookie: gw_session=\xff\xfe\r\n"),
        ("/v1/me", b"Cookie: gw_session=\xff\xfe\r\n"),
        (
            "/v1/session/org",
            b"Cookie: gw_session=" + issued["cookie"]["value"].encode() + b"\r\nX-CSRF-Token: \xff\r\n",
        ),
    ):
        method = b"POST" if target.endswith("org") else b"GET"
        reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
        writer.write(
            method + b" " + target.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n" + extra + b"\r\n"
        )
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        writer.close()
        assert status in (401, 403), (target, status)


async def test_session_reads_of_one_tick_share_a_round_trip(rclient: aioredis.Redis, services: Services) -> None:
    """Every session asked for in one event-loop tick is read in one pipeline, each session once; a
    Redis that cannot answer is 503 for every waiter, never a signed-out 401."""
    cfg = make_config(services).sessions
    store = SessionStore(rclient, Breaker("redis"), cfg)
    one, _ = await store.create("usr_a", None, "org_a", "", None)
    two, _ = await store.create("usr_b", None, "org_b", "", None)

    async def hgetalls() -> int:
        return int((await rclient.info("commandstats")).get("cmdstat_hgetall", {}).get("calls", 0))

    before = await hgetalls()
    found = await asyncio.gather(*(store.load(s) for s in [one, two] * 10), store.load("nobody"))
    assert [s.user_id if s else None for s in found] == ["usr_a", "usr_b"] * 10 + [None]
    assert await hgetalls() - before == 3  # one, two, nobody: once each
    dead = aioredis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.2)
    broken = SessionStore(dead, Breaker("redis"), cfg)
    results = await asyncio.gather(*(broken.load(s) for s in (one, two, one)), return_exceptions=True)
    assert all(isinstance(r, AuthUnavailable) for r in results), results
    await dead.aclose()


async def test_one_cancelled_read_does_not_cancel_the_others(rclient: aioredis.Redis, services: Services) -> None:
    """Found by review: requests of one session in one tick share a read; cancelling one of them (a client
    gone, a shutdown) cancelled it for all."""
    store = SessionStore(rclient, Breaker("redis"), make_config(services).sessions)
    cookie, _ = await store.create("usr_a", None, "org_a", "", None)
    first, second = asyncio.ensure_future(store.load(cookie)), asyncio.ensure_future(store.load(cookie))
    await asyncio.sleep(0)
    first.cancel()
    found = await second
    assert found is not None and found.user_id == "usr_a"
