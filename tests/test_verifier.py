"""One Verifier behind every entry point: the proxy endpoints, `/v1/keys/verify`, the `/v1/` API and the
web page are charged alike (the key's limit and its org's) and count failures alike."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.app import create_app
from tests._faultproxy import FaultProxy
from tests.conftest import ROOT, Client, Services, World, make_config, nginx_headers

POLICY = str(ROOT / "config/policy.yaml")


async def _client(aiohttp_client: Any, services: Services, **limits: Any) -> Client:
    c: Client = await aiohttp_client(create_app(make_config(services, rate_limits=limits, policy_file=POLICY)))
    return c


def _calls(world: World, key: str) -> dict[str, tuple[str, str, dict[str, Any]]]:
    """One call of each entry point, each acting in org A."""
    bearer = {"Authorization": f"Bearer {key}"}
    return {
        "proxy": ("GET", "/auth/nginx", {"headers": nginx_headers(key, f"/v1/orgs/{world.org_a}/things")}),
        "verify": ("POST", "/v1/keys/verify", {"json": {"key": key, "org": world.org_a}}),
        "api": ("GET", f"/v1/orgs/{world.org_a}/members", {"headers": bearer}),
        "sign-in": ("POST", "/ui/session", {"json": {"key": key}}),
    }


async def _refused(c: Client, method: str, path: str, kw: dict[str, Any]) -> bool:
    r = await c.request(method, path, **kw)
    if path == "/v1/keys/verify":
        body: dict[str, Any] = await r.json()
        return r.status == 200 and bool(body["code"] == "RATE_LIMITED")
    return bool(r.status == 429)


async def test_every_entry_point_spends_the_orgs_limit(aiohttp_client: Any, services: Services, world: World) -> None:
    """The org's budget is shared by every way in: before, a `/v1/` call acting in an org spent only the
    key's limit, so the management API was a way around the org's."""
    c = await _client(aiohttp_client, services, org={"rate": "1/1h", "burst": 4, "exact": True})
    k = await world.key(orgs=[world.org_a])
    calls = _calls(world, k["key"])
    for name in ("proxy", "verify", "api"):
        method, path, kw = calls[name]
        assert not await _refused(c, method, path, kw), name
    method, path, kw = calls["api"]
    assert not await _refused(c, method, path, kw)  # the fourth of four
    for name in ("proxy", "verify", "api"):
        method, path, kw = calls[name]
        assert await _refused(c, method, path, kw), f"{name} got past a spent org limit"


async def test_every_entry_point_spends_the_keys_limit(aiohttp_client: Any, services: Services, world: World) -> None:
    c = await _client(aiohttp_client, services)
    k = await world.key(orgs=[world.org_a], rate_limit="4/1h")
    calls = _calls(world, k["key"])
    for name in ("proxy", "verify", "api", "sign-in"):
        method, path, kw = calls[name]
        assert not await _refused(c, method, path, kw), name
    for name in ("proxy", "verify", "api", "sign-in"):
        method, path, kw = calls[name]
        assert await _refused(c, method, path, kw), f"{name} got past a spent key limit"


async def test_compiled_permissions_follow_a_role_change(client: Client, world: World) -> None:
    """What a cached key grants is computed once per fill; a membership change invalidates it with the
    key, so the next request sees the new role."""
    k = await world.key(orgs=[world.org_a])
    h = nginx_headers(k["key"], f"/v1/orgs/{world.org_a}/things")
    r = await client.get("/auth/nginx", headers=h)
    assert (r.status, r.headers["X-Role"], r.headers["X-Scopes"]) == (200, "admin", "*")
    await world.directory.set_member(world.org_a, world.user, "viewer")
    for _ in range(100):  # the invalidation arrives by NOTIFY
        r = await client.get("/auth/nginx", headers=h)
        if r.headers["X-Role"] == "viewer":
            break
    assert (r.headers["X-Role"], r.headers["X-Scopes"]) == ("viewer", "*:read")


async def test_a_management_call_sees_its_own_writes(client: Client, world: World) -> None:
    """An org created through the API is manageable by the next call at once, whatever the cache holds
    (the key's memberships are re-read for management calls)."""
    k = await world.key(role="owner")
    auth = {"Authorization": f"Bearer {k['key']}"}
    assert (await client.get("/v1/me", headers=auth)).status == 200  # cached, with its two orgs
    for i in range(5):
        r = await client.post("/v1/orgs", json={"name": f"New {i}"}, headers=auth)
        org = (await r.json())["id"]
        r = await client.get(f"/v1/orgs/{org}/members", headers=auth)
        assert r.status == 200, await r.text()


async def test_a_refused_management_call_reads_nothing_from_postgres(
    aiohttp_client: Any, services: Services, world: World
) -> None:
    """Found by review: the re-read from Postgres came before the rate-limit charge, so a key over its
    limit cost a Postgres query per call. A refusal now comes from the cache: with Postgres unreachable
    it is still a 429, not a 503."""
    with FaultProxy(services.pg.port) as pg:
        url = f"postgresql://postgres@127.0.0.1:{pg.port}/postgres"
        c = await aiohttp_client(create_app(make_config(services, database={"url": url, "timeout_ms": 300})))
        limited = await world.key(name="limited", rate_limit="2/1h")
        auth = {"Authorization": f"Bearer {limited['key']}"}
        for _ in range(2):
            assert (await c.get("/v1/me", headers=auth)).status == 200
        pg.refuse()
        r = await c.get("/v1/me", headers=auth)
        assert r.status == 429, await r.text()
        pg.pass_()


async def test_a_refusal_by_a_limit_is_shown_in_the_orgs_audit(client: Client, world: World) -> None:
    """Found by review: a 429 of a key acting in an org lost the org in its auth.failed row."""
    k = await world.key(orgs=[world.org_a], rate_limit="1/1h")
    h = nginx_headers(k["key"], f"/v1/orgs/{world.org_a}/things")
    assert (await client.get("/auth/nginx", headers=h)).status == 200
    assert (await client.get("/auth/nginx", headers=h)).status == 429
    rows: list[Any] = []
    for _ in range(50):
        rows = await world.pool.fetch(
            "SELECT org_id, detail->>'code' AS code FROM audit_events WHERE type = 'auth.failed' AND key_id = $1",
            k["id"],
        )
        if rows:
            break
        await asyncio.sleep(0.05)
    assert [(r["org_id"], r["code"]) for r in rows] == [(world.org_a, "rate_limited")]


async def test_a_permission_refused_by_keys_verify_spends_the_keys_limit(client: Client, world: World) -> None:
    """Found by review: `/v1/keys/verify` checked its `permission` after the Verifier, so a refusal there
    spent nothing, while the same refusal through a proxy spends a request of the key's limit."""
    k = await world.key(role="viewer", orgs=[world.org_a], rate_limit="2/1h")
    body = {"key": k["key"], "org": world.org_a, "permission": "calls:write"}
    codes = [(await (await client.post("/v1/keys/verify", json=body)).json())["code"] for _ in range(2)]
    assert codes == ["INSUFFICIENT_PERMISSIONS"] * 2
    del body["permission"]  # the two refusals spent the key's budget of two
    assert (await (await client.post("/v1/keys/verify", json=body)).json())["code"] == "RATE_LIMITED"
