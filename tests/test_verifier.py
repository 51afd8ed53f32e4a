"""One Verifier behind every entry point: the proxy endpoints, `/v1/keys/verify`, the `/v1/` API and the
web page are charged alike (the key's limit and its org's) and count failures alike."""

from __future__ import annotations

from typing import Any

from gateway.app import create_app
from tests.conftest import ROOT, Services, World, make_config, nginx_headers

Client = Any
POLICY = str(ROOT / "config/policy.yaml")


async def _client(aiohttp_client: Any, services: Services, **limits: Any) -> Client:
    return await aiohttp_client(create_app(make_config(services, rate_limits=limits, policy_file=POLICY)))


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
    await world.admin.set_member(world.org_a, world.user, "viewer")
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
