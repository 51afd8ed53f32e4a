"""The self-serve /v1/ API, driven over HTTP with real keys."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gateway.api import api_app
from gateway.app import create_app
from gateway.audit import CLI
from gateway.data import audit as data_audit
from gateway.data.audit import FailureRow
from gateway.errors import ConfigError
from gateway.schemas import REQUESTS
from tests.conftest import Client, Services, World, make_config, nginx_headers, poll


def auth(key: dict[str, Any] | str, **extra: str) -> dict[str, str]:
    raw = key if isinstance(key, str) else key["key"]
    return {"Authorization": f"Bearer {raw}", "User-Agent": "api-test/1.0", **extra}


async def ok(r: Any, status: int = 200) -> Any:
    body = await r.json()
    assert r.status == status, body
    return body


async def err(r: Any, status: int, code: str) -> dict[str, Any]:
    body: dict[str, Any] = await r.json()
    assert (r.status, body["error"]["code"]) == (status, code), body
    return body


async def accept(client: Client, world: World, invitation: dict[str, Any]) -> None:
    """The invited user accepts, with an all-orgs key of their own."""
    own = await world.key(name="invited", user=invitation["user_id"], role="owner")
    await ok(await client.post(f"/v1/invitations/{invitation['id']}/accept", headers=auth(own)))


async def service_account_key(client: Client, org: str, admin_key: dict[str, Any]) -> tuple[Any, Any]:
    """A member-role service account of `org` and a key for it, made through the API by `admin_key`."""
    sa = await ok(
        await client.post(
            f"/v1/orgs/{org}/service-accounts", json={"name": "ci", "role": "member"}, headers=auth(admin_key)
        ),
        201,
    )
    sa_key = await ok(
        await client.post(
            f"/v1/orgs/{org}/service-accounts/{sa['id']}/keys",
            json={"name": "deploy", "role": "member"},
            headers=auth(admin_key),
        ),
        201,
    )
    return sa, sa_key


async def test_authentication(client: Client, world: World) -> None:
    await err(await client.get("/v1/me"), 401, "missing_credentials")
    await err(await client.get("/v1/me", headers=auth("gw_live_nope")), 401, "invalid_api_key")
    k = await world.key()
    me = await ok(await client.get("/v1/me", headers=auth(k)))
    assert me["user_id"] == world.user and me["key_id"] == k["id"]
    assert {o["id"]: o["role"] for o in me["orgs"]} == {world.org_a: "admin", world.org_b: "viewer"}
    await world.keyring.revoke_key(k["id"])
    r = await poll(lambda: client.get("/v1/me", headers=auth(k)), lambda r: r.status != 200)
    await err(r, 401, "revoked_api_key")


async def test_create_use_list_get_revoke_rotate(client: Client, world: World) -> None:
    me = await world.key(name="me")
    body = {
        "name": "ci",
        "role": "member",
        "orgs": [world.org_a],
        "scopes": ["calls:read"],
        "expires_in": "30d",
        "allowed_ips": ["127.0.0.0/8"],
        "rate_limit": "100/1m",
        "env": "live",
    }
    created = await ok(await client.post("/v1/keys", json=body, headers=auth(me)), 201)
    raw = created["key"]
    assert raw.startswith(f"gw_live_{created['id']}_")
    assert created["effective_role"] == {world.org_a: "member"}
    r = await client.get("/auth/nginx", headers=nginx_headers(raw))
    assert (r.status, r.headers["X-Scopes"]) == (200, "calls:read")
    got = await ok(await client.get(f"/v1/keys/{created['id']}", headers=auth(me)))
    assert "key" not in got and got["scopes"] == ["calls:read"]
    rotated = await ok(
        await client.post(f"/v1/keys/{created['id']}/rotate", json={"grace": "1h"}, headers=auth(me)), 201
    )
    assert rotated["key"] != raw and rotated["scopes"] == ["calls:read"] and rotated["rate_limit"] == "100/1m"
    revoked = await ok(await client.post(f"/v1/keys/{rotated['id']}/revoke", headers=auth(me)))
    assert revoked["status"] == "revoked"
    r = await poll(lambda: client.get("/auth/nginx", headers=nginx_headers(rotated["key"])), lambda r: r.status != 200)
    assert r.headers["X-Auth-Error"] == "revoked_api_key"
    listed = await ok(await client.get("/v1/keys?status=active", headers=auth(me)))
    assert {k["id"] for k in listed["items"]} == {me["id"], created["id"]}


async def test_raw_keys_and_management_answers_are_never_cached(client: Client, world: World) -> None:
    me = await world.key(name="me")
    body = {"name": "ci", "role": "member", "orgs": [world.org_a]}
    created = await client.post("/v1/keys", json=body, headers=auth(me))
    assert created.status == 201 and created.headers["Cache-Control"] == "no-store"
    rotated = await client.post(f"/v1/keys/{(await created.json())['id']}/rotate", headers=auth(me))
    assert rotated.status == 201 and rotated.headers["Cache-Control"] == "no-store"
    for r in (await client.get("/v1/keys", headers=auth(me)), await client.get("/v1/me")):
        assert r.headers["Cache-Control"] == "no-store", r.status


async def test_effective_role_is_capped_in_listings(client: Client, world: World) -> None:
    owner_key = await world.key(role="owner")
    listed = await ok(await client.get("/v1/keys", headers=auth(owner_key)))
    (k,) = listed["items"]
    assert k["effective_role"] == {world.org_a: "admin", world.org_b: "viewer"}


async def test_pagination(client: Client, world: World) -> None:
    me = await world.key(name="k0")
    for i in range(1, 5):
        await world.key(name=f"k{i}")
    seen: list[str] = []
    cursor = None
    for _ in range(5):
        url = "/v1/keys?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = await ok(await client.get(url, headers=auth(me)))
        seen += [k["name"] for k in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"k{i}" for i in range(5)]
    await err(await client.get("/v1/keys?cursor=!!", headers=auth(me)), 400, "invalid_request")
    await err(await client.get("/v1/keys?limit=1000", headers=auth(me)), 400, "invalid_request")


@pytest.mark.parametrize(
    ("creator", "body", "code"),
    [
        ({"role": "viewer"}, {"role": "admin"}, "insufficient_permissions"),
        ({"orgs": "A"}, {"role": "viewer"}, "org_not_allowed"),  # "all" from an org-scoped key
        ({"scopes": ["calls:read"]}, {"role": "viewer"}, "insufficient_permissions"),
        ({"scopes": ["calls:read"]}, {"role": "viewer", "scopes": ["calls:*"]}, "insufficient_permissions"),
        ({"env": "test"}, {"role": "viewer", "env": "live"}, "insufficient_permissions"),
        ({"allow_ips": ["127.0.0.1/32"]}, {"role": "viewer"}, "ip_not_allowed"),
        ({"expires_in": "1d"}, {"role": "viewer"}, "insufficient_permissions"),  # never-expiring from an expiring key
        ({"expires_in": "1d"}, {"role": "viewer", "expires_in": "30d"}, "insufficient_permissions"),
    ],
)
async def test_no_key_creates_a_more_powerful_key(
    client: Client, world: World, creator: dict[str, Any], body: dict[str, Any], code: str
) -> None:
    if creator.get("orgs") == "A":
        creator = {**creator, "orgs": [world.org_a]}
    me = await world.key(**{"role": "admin", **creator})
    await err(await client.post("/v1/keys", json={"name": "x", **body}, headers=auth(me)), 403, code)


async def test_org_admin_sees_every_key_of_the_org_and_nobody_else_does(client: Client, world: World) -> None:
    admin_key = await world.key(name="admin")
    other = (await world.directory.create_user("dev@example.com"))["id"]
    await world.directory.set_member(world.org_a, other, "member")
    dev_key = await world.key(name="dev", user=other, role="member")
    listed = await ok(await client.get(f"/v1/keys?org={world.org_a}", headers=auth(admin_key)))
    assert {k["name"] for k in listed["items"]} == {"admin", "dev"}
    await ok(await client.get(f"/v1/keys/{dev_key['id']}", headers=auth(admin_key)))
    await err(await client.get(f"/v1/keys?org={world.org_a}", headers=auth(dev_key)), 403, "insufficient_permissions")
    await err(await client.get(f"/v1/keys/{admin_key['id']}", headers=auth(dev_key)), 404, "not_found")
    # In org B the first user is only a viewer: B's keys are not theirs to list.
    await err(await client.get(f"/v1/keys?org={world.org_b}", headers=auth(admin_key)), 403, "insufficient_permissions")
    stranger_org = (await world.directory.create_org("Elsewhere"))["id"]
    await err(await client.get(f"/v1/keys?org={stranger_org}", headers=auth(admin_key)), 404, "not_found")
    await err(await client.get(f"/v1/orgs/{stranger_org}", headers=auth(admin_key)), 404, "not_found")
    await err(await client.get("/v1/keys/nope", headers=auth(admin_key)), 404, "not_found")
    r = await client.post(f"/v1/keys/{dev_key['id']}/revoke", headers=auth(admin_key))
    assert (await ok(r))["status"] == "revoked"


async def test_orgs_members_and_roles(client: Client, world: World) -> None:
    k = await world.key(role="owner")
    new = await ok(await client.post("/v1/orgs", json={"name": "New"}, headers=auth(k)), 201)
    orgs = await ok(await client.get("/v1/orgs", headers=auth(k)))
    assert {o["id"]: o["role"] for o in orgs["items"]}[new["id"]] == "owner"
    m = await ok(
        await client.post(
            f"/v1/orgs/{new['id']}/members", json={"email": "x@example.com", "role": "member"}, headers=auth(k)
        ),
        202,
    )
    assert m["status"] == "pending"  # an invitation: x joins once x accepts it
    await accept(client, world, m)
    members = await ok(await client.get(f"/v1/orgs/{new['id']}/members", headers=auth(k)))
    assert {x["email"]: x["role"] for x in members["items"]} == {
        "owner@example.com": "owner",
        "x@example.com": "member",
    }
    await ok(await client.put(f"/v1/orgs/{new['id']}/members/{m['user_id']}", json={"role": "admin"}, headers=auth(k)))
    # In org A the key's owner is an admin: it cannot make anyone an owner.
    await err(
        await client.post(
            f"/v1/orgs/{world.org_a}/members", json={"email": "y@example.com", "role": "owner"}, headers=auth(k)
        ),
        403,
        "insufficient_permissions",
    )
    await ok(await client.delete(f"/v1/orgs/{new['id']}/members/{m['user_id']}", headers=auth(k)))
    await err(await client.delete(f"/v1/orgs/{new['id']}/members/{m['user_id']}", headers=auth(k)), 404, "not_found")
    viewer = await world.key(name="v", role="viewer")
    await err(
        await client.get(f"/v1/orgs/{world.org_a}/members", headers=auth(viewer)), 403, "insufficient_permissions"
    )


async def test_projects(client: Client, world: World) -> None:
    k = await world.key()
    p = await ok(await client.post(f"/v1/orgs/{world.org_a}/projects", json={"name": "web"}, headers=auth(k)), 201)
    assert (await ok(await client.get(f"/v1/orgs/{world.org_a}/projects/{p['id']}", headers=auth(k))))["name"] == "web"
    await err(await client.get(f"/v1/orgs/{world.org_b}/projects/{p['id']}", headers=auth(k)), 404, "not_found")
    naming = await world.key(name="naming", orgs=[world.org_a], projects=[p["id"]])
    await err(await client.delete(f"/v1/orgs/{world.org_a}/projects/{p['id']}", headers=auth(k)), 409, "conflict")
    gone = await ok(await client.delete(f"/v1/orgs/{world.org_a}/projects/{p['id']}?revoke_keys=true", headers=auth(k)))
    assert gone["revoked_keys"] == [naming["id"]]
    assert (await world.keyring.show_key(naming["id"]))["status"] == "revoked"
    assert (await ok(await client.get(f"/v1/orgs/{world.org_a}/projects", headers=auth(k))))["items"] == []


async def test_service_accounts_outlive_their_creator(client: Client, world: World) -> None:
    creator = (await world.directory.create_user("admin2@example.com"))["id"]
    await world.directory.set_member(world.org_a, creator, "admin")
    k = await world.key(name="creator", user=creator)
    await err(
        await client.post(
            f"/v1/orgs/{world.org_a}/service-accounts", json={"name": "ci", "role": "owner"}, headers=auth(k)
        ),
        403,
        "insufficient_permissions",
    )
    sa, sa_key = await service_account_key(client, world.org_a, k)
    assert sa_key["user_id"] == sa["id"] and sa_key["orgs"] == [world.org_a]
    await world.directory.remove_member(world.org_a, creator)  # the person who made it leaves
    await asyncio.sleep(0.3)
    r = await client.get("/auth/nginx", headers=nginx_headers(sa_key["key"]))
    assert (r.status, r.headers["X-Org"], r.headers["X-Role"], r.headers["X-User"]) == (
        200,
        world.org_a,
        "member",
        sa["id"],
    )
    admin_key = await world.key(name="a")
    listed = await ok(await client.get(f"/v1/orgs/{world.org_a}/service-accounts", headers=auth(admin_key)))
    assert [s["id"] for s in listed["items"]] == [sa["id"]]


async def test_audit_endpoint(client: Client, world: World) -> None:
    k = await world.key(name="admin", orgs=[world.org_a])
    created = await ok(
        await client.post("/v1/keys", json={"name": "x", "role": "viewer", "orgs": [world.org_a]}, headers=auth(k)), 201
    )
    await ok(await client.post(f"/v1/keys/{created['id']}/revoke", headers=auth(k)))
    events = await ok(await client.get(f"/v1/orgs/{world.org_a}/audit?key_id={created['id']}", headers=auth(k)))
    types = [e["type"] for e in events["items"]]
    assert types == ["api_key.revoked", "api_key.created"]
    e = events["items"][0]
    assert (e["actor"], e["ip"], e["user_agent"], e["detail"]["via_key"]) == (
        world.user,
        "127.0.0.1",
        "api-test/1.0",
        k["id"],
    )
    page = await ok(await client.get(f"/v1/orgs/{world.org_a}/audit?limit=1&type=api_key.created", headers=auth(k)))
    assert len(page["items"]) == 1 and page["next_cursor"]
    page2 = await ok(
        await client.get(
            f"/v1/orgs/{world.org_a}/audit?limit=1&type=api_key.created&cursor={page['next_cursor']}", headers=auth(k)
        )
    )
    assert page2["items"][0]["id"] < page["items"][0]["id"]
    text = str(await ok(await client.get(f"/v1/orgs/{world.org_a}/audit?limit=100", headers=auth(k))))
    assert created["key"] not in text and k["key"] not in text
    viewer = await world.key(name="v", role="viewer", orgs=[world.org_a])
    await err(await client.get(f"/v1/orgs/{world.org_a}/audit", headers=auth(viewer)), 403, "insufficient_permissions")
    await err(
        await client.get(f"/v1/orgs/{world.org_a}/audit?since=yesterday", headers=auth(k)), 400, "invalid_request"
    )


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "x", "role": "viewer", "colour": "red"}, "colour"),
        ({"name": 5, "role": "viewer"}, "name"),
        ({"role": "viewer"}, "name"),
        ({"name": "x", "role": "god"}, "role"),
        ({"name": "x", "role": "viewer", "scopes": ["s:r"] * 101}, "scopes"),
        ({"name": "x" * 201, "role": "viewer"}, "name"),
        ({"name": "x", "role": "viewer", "orgs": []}, "orgs"),
        ({"name": "x", "role": "viewer", "expires_in": "soon"}, "expires_in"),
        ({"name": "x", "role": "viewer", "allowed_ips": ["nope"]}, "allowed_ips"),
    ],
)
async def test_input_validation_names_the_field(client: Client, world: World, body: dict[str, Any], field: str) -> None:
    k = await world.key()
    e = await err(await client.post("/v1/keys", json=body, headers=auth(k)), 400, "invalid_request")
    assert e["error"]["field"] == field
    await err(await client.post("/v1/keys", data=b"[]", headers=auth(k)), 400, "invalid_request")


async def test_openapi_documents_every_route(client: Client) -> None:
    doc = await ok(await client.get("/v1/openapi.json"))
    assert doc["openapi"] == "3.1.0"
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops if method != "parameters"}
    served = {
        ("/v1" + r.resource.canonical, r.method.lower())
        for r in api_app().router.routes()
        if r.resource is not None and r.method != "HEAD"
    }
    served |= {("/v1/keys/verify", "post"), ("/v1/tokens/refresh", "post"), ("/v1/tokens/revoke", "post")}
    assert served == documented


async def test_openapi_names_each_operation_and_its_bodies_come_from_the_models(client: Client) -> None:
    """Issue 11: the document had no operationIds and a hand-kept copy of the request schemas beside the
    hand-written checks. Each operation is now named after the handler serving it, and each request body's
    schema is the very model `/v1/` validates that body with (gateway.schemas)."""
    doc = await ok(await client.get("/v1/openapi.json"))
    handlers = {r.handler.__name__ for r in api_app().router.routes()}
    handlers |= {"keys_verify", "refresh_token", "revoke_token"}  # on the main app: they need no credential
    ids = [op["operationId"] for ops in doc["paths"].values() for m, op in ops.items() if m != "parameters"]
    assert len(ids) == len(set(ids)) and set(ids) == handlers
    for model in REQUESTS:
        assert doc["components"]["schemas"][model.__name__] == model.model_json_schema(
            ref_template="#/components/schemas/{model}"
        )
    bodies = [
        op["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
        for ops in doc["paths"].values()
        for m, op in ops.items()
        if m != "parameters" and "requestBody" in op
    ]
    assert set(bodies) == {m.__name__ for m in REQUESTS}


async def test_rotation_hands_out_keys_only_to_their_owner(client: Client, world: World) -> None:
    strong = await world.key(name="strong", role="admin")
    weak = await world.key(name="weak", role="viewer", scopes=["calls:read"])
    # A weaker key of the same owner cannot rotate the stronger one into its hands...
    await err(await client.post(f"/v1/keys/{strong['id']}/rotate", headers=auth(weak)), 403, "insufficient_permissions")
    # ...nor can an admin obtain a new raw key of another member's key (revoking it is fine).
    other = (await world.directory.create_user("dev@example.com"))["id"]
    await world.directory.set_member(world.org_a, other, "member")
    dev = await world.key(name="dev", user=other, role="member", orgs=[world.org_a])
    await err(await client.post(f"/v1/keys/{dev['id']}/rotate", headers=auth(strong)), 403, "insufficient_permissions")
    # An admin may rotate the org's service-account keys.
    _, sa_key = await service_account_key(client, world.org_a, strong)
    await ok(await client.post(f"/v1/keys/{sa_key['id']}/rotate", headers=auth(strong)), 201)


async def test_an_org_always_keeps_an_owner(client: Client, world: World) -> None:
    """Before, the last owner could remove or demote themselves (200), leaving an org nobody owns."""
    k = await world.key(role="owner")
    org = (await ok(await client.post("/v1/orgs", json={"name": "Kept"}, headers=auth(k)), 201))["id"]
    me = f"/v1/orgs/{org}/members/{world.user}"
    await err(await client.delete(me, headers=auth(k)), 409, "conflict")
    await err(await client.put(me, json={"role": "admin"}, headers=auth(k)), 409, "conflict")
    members = await ok(await client.get(f"/v1/orgs/{org}/members", headers=auth(k)))
    assert {x["email"]: x["role"] for x in members["items"]} == {"owner@example.com": "owner"}
    # With a second owner, either may step down, but not both.
    co_owner = {"email": "co@example.com", "role": "owner"}
    other = await ok(await client.post(f"/v1/orgs/{org}/members", json=co_owner, headers=auth(k)), 202)
    await accept(client, world, other)
    results = await asyncio.gather(
        world.directory.set_member(org, world.user, "admin"),
        world.directory.set_member(org, other["user_id"], "member"),
        return_exceptions=True,
    )
    assert sorted(type(r).__name__ for r in results) == ["Conflict", "dict"]


@pytest.mark.parametrize(
    ("child", "status"),
    [(None, 403), ("10/1m", 403), ("6/2m", 403), ("600/1h", 403), ("5/1m", 201), ("5/2m", 201), ("1/1s", 403)],
)
async def test_a_child_key_never_has_a_higher_limit(
    client: Client, world: World, child: str | None, status: int
) -> None:
    """Before, a key limited to 5/min created a child with no limit, which then got the default 600/min."""
    parent = await world.key(orgs=[world.org_a], rate_limit="5/1m")
    body: dict[str, Any] = {"name": "child", "role": "member", "orgs": [world.org_a]}
    if child is not None:
        body["rate_limit"] = child
    r = await client.post("/v1/keys", json=body, headers=auth(parent))
    if status == 403:
        await err(r, 403, "insufficient_permissions")
    else:
        await ok(r, 201)


async def test_error_bodies_echo_nothing_key_shaped(client: Client, world: World) -> None:
    """Error messages quoted the caller's input: `unknown field gw_live_…`, `no key gw_live_…`. A client
    that pasted its key in the wrong place got it back in a body that proxies and clients log."""
    owner = await world.key(orgs=[world.org_a], role="owner")
    secret = "Zq9SecretPart0fAKey"
    body = await err(
        await client.post("/v1/keys", json={f"gw_live_k1_{secret}": "x"}, headers=auth(owner)), 400, "invalid_request"
    )
    assert secret not in str(body) and "gw_live_[redacted]" in body["error"]["message"], body
    body = await err(await client.get(f"/v1/keys/gw_test_{secret}", headers=auth(owner)), 404, "not_found")
    assert secret not in str(body), body
    r = await client.post("/v1/keys/verify", json={"key": owner["key"], f"x_live_{secret}": 1})
    assert r.status == 400 and secret not in await r.text()


CUSTOM_ROLES = {
    "order": ["viewer", "editor", "owner"],
    "permissions": {"viewer": ["*:read"], "editor": ["*:read", "*:write"], "owner": ["*"]},
}


async def test_customised_roles_name_their_admin(aiohttp_client: Any, services: Services, world: World) -> None:
    """Issue 11: with roles customised without `admin`, the org-admin checks still named it and raised
    ValueError (answered 503). `roles.admin` names the least role that administers an org."""
    cfg = make_config(services, roles={**CUSTOM_ROLES, "admin": "owner"})
    c = await aiohttp_client(create_app(cfg))
    await world.directory.set_member(world.org_a, world.user, "owner")
    owner = await world.key(role="owner", orgs=[world.org_a])
    viewer = await world.key(name="v", role="viewer", orgs=[world.org_a])
    r = await c.get(f"/v1/orgs/{world.org_a}/members", headers=auth(owner["key"]))
    assert r.status == 200, await r.text()
    r = await c.get(f"/v1/orgs/{world.org_a}/members", headers=auth(viewer["key"]))
    assert (r.status, (await r.json())["error"]["message"]) == (403, "requires role owner in this org")


def test_roles_without_their_admin_are_refused_at_start(services: Services) -> None:
    with pytest.raises(ConfigError, match=r"roles\.admin: 'admin' is not a role in roles\.order"):
        make_config(services, roles=CUSTOM_ROLES)


async def test_a_page_of_keys_shows_each_key_as_its_own_page_does(client: Client, world: World) -> None:
    """Issue 11: the listing read each key again, its owner's roles and its stops, one key at a time (three
    queries per key); it now reads them for the whole page at once. What it shows is unchanged: each item
    equals the key's own GET, for keys of several owners, an all-orgs key, and a key stopped in an org."""
    me = await world.key(name="admin", orgs=[world.org_a])
    other = (await world.directory.create_user("dev@example.com"))["id"]
    await world.directory.set_member(world.org_a, other, "member")
    await world.directory.set_member(world.org_b, other, "member")
    for i in range(3):
        await world.key(name=f"dev{i}", role="member", user=other, orgs=[] if i == 0 else [world.org_a])
    stopped = await world.key(name="stopped", role="member", user=other)
    await world.keyring.stop_key_in(stopped["id"], [world.org_b], CLI)
    items = (await ok(await client.get(f"/v1/keys?org={world.org_a}&limit=3", headers=auth(me))))["items"]
    cursor = ""
    seen: list[dict[str, Any]] = []
    while True:
        page = await ok(await client.get(f"/v1/keys?org={world.org_a}&limit=3{cursor}", headers=auth(me)))
        seen.extend(page["items"])
        if not page["next_cursor"]:
            break
        cursor = f"&cursor={page['next_cursor']}"
    assert len(items) == 3 and len(seen) == 5  # mine, the three dev keys and the stopped one, over two pages
    for item in seen:
        assert item == await ok(await client.get(f"/v1/keys/{item['id']}", headers=auth(me)))
    assert {i["name"] for i in seen} >= {"dev0", "dev1", "dev2", "stopped"}


async def _used(world: World, key_id: str, org: str | None, at: datetime, count: int, ip: str) -> None:
    """An aggregated `api_key.used` row, as gateway.audit.UsageAuditor writes one per key per minute."""
    async with world.pool.acquire() as conn:
        await data_audit.insert_failures(conn, [FailureRow(at, "api_key.used", org, key_id, ip, count, {})])


async def test_an_admin_lists_the_orgs_keys_with_owner_names_by_search_and_status(client: Client, world: World) -> None:
    """Issue 13: the page showed user ids where names belong, and had no search. Keys carry their owner's
    name (a person's email, a service account's name) and their projects' names; `q` finds keys by name (any
    case) or id, as text (no wildcards); `status` and `expires_before` filter."""
    admin = await world.key(name="admin", orgs=[world.org_a])
    dev = (await world.directory.create_user("dev@example.com"))["id"]
    await world.directory.set_member(world.org_a, dev, "member")
    project = await world.directory.create_project(world.org_a, "web")
    laptop = await world.key(name="Dev Laptop", user=dev, role="member", orgs=[world.org_a], projects=[project["id"]])
    soon = await world.key(name="soon_100%", user=dev, role="member", orgs=[world.org_a], expires_in="2d")
    await service_account_key(client, world.org_a, admin)

    async def listed(query: str, key: dict[str, Any] = admin) -> list[dict[str, Any]]:
        return list((await ok(await client.get(f"/v1/keys?org={world.org_a}{query}", headers=auth(key))))["items"])

    everything = {k["name"]: k for k in await listed("")}
    assert set(everything) == {"admin", "Dev Laptop", "soon_100%", "deploy"}
    assert (everything["Dev Laptop"]["owner_name"], everything["Dev Laptop"]["owner_kind"]) == (
        "dev@example.com",
        "human",
    )
    assert everything["Dev Laptop"]["project_names"] == {project["id"]: "web"}
    assert (everything["deploy"]["owner_name"], everything["deploy"]["owner_kind"]) == ("ci", "service")
    assert everything["admin"]["owner_name"] == "owner@example.com"
    assert [k["name"] for k in await listed("&q=dev%20LAP")] == ["Dev Laptop"]
    assert [k["name"] for k in await listed(f"&q={laptop['id'][3:12]}")] == ["Dev Laptop"]
    assert [k["name"] for k in await listed("&q=%25")] == ["soon_100%"]  # a % is text, not a wildcard
    assert [k["name"] for k in await listed("&q=_1")] == ["soon_100%"]
    assert await listed("&q=nothing-like-it") == []
    assert [k["name"] for k in await listed("&q=%20%20")] == [k for k in everything]  # blank: no filter
    await ok(await client.post(f"/v1/keys/{laptop['id']}/revoke", headers=auth(admin)))
    assert [k["name"] for k in await listed("&status=revoked")] == ["Dev Laptop"]
    week = (datetime.now(UTC) + timedelta(days=7)).isoformat().replace("+00:00", "Z")
    assert [k["id"] for k in await listed(f"&status=active&expires_before={week}")] == [soon["id"]]
    assert [k["name"] for k in await listed("&status=active&q=dev%20lap")] == []  # a space: in no key id
    assert await listed("&q=%ED%A0%80") == []  # not UTF-8: read as replacement characters, found nowhere
    bad = ("&q=%01", "&q=" + "x" * 201, "&expires_before=soon")
    for query, field in zip(bad, ("q", "q", "expires_before"), strict=True):
        e = await err(
            await client.get(f"/v1/keys?org={world.org_a}{query}", headers=auth(admin)), 400, "invalid_request"
        )
        assert e["error"]["field"] == field
    # A member lists only their own keys: the org's are its admins'.
    dev_key = await world.key(name="dev-own", user=dev, role="member", orgs=[world.org_a])
    await err(await client.get(f"/v1/keys?org={world.org_a}", headers=auth(dev_key)), 403, "insufficient_permissions")
    own = await ok(await client.get("/v1/keys?q=own", headers=auth(dev_key)))
    assert [k["name"] for k in own["items"]] == ["dev-own"]


async def test_key_usage_per_day_and_last_use_as_each_caller_may_see_them(client: Client, world: World) -> None:
    """Issue 13: requests per day for a key, summed in SQL from the aggregated `api_key.used` rows, and the
    last use's time and address. Its owner sees all of it; an org's admin sees its use in their org only;
    anyone else sees nothing (404, as for a key that does not exist)."""
    dev = (await world.directory.create_user("dev@example.com"))["id"]
    for org in (world.org_a, world.org_b):
        await world.directory.set_member(org, dev, "member")
    dev_key = await world.key(name="dev-laptop", user=dev, role="member")  # acts in A and B
    admin = await world.key(name="admin", orgs=[world.org_a])
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    await _used(world, dev_key["id"], world.org_a, today + timedelta(minutes=1), 5, "198.51.100.1")
    await _used(world, dev_key["id"], world.org_a, today + timedelta(minutes=2), 2, "198.51.100.2")
    await _used(world, dev_key["id"], world.org_a, today - timedelta(days=2), 7, "198.51.100.3")
    await _used(world, dev_key["id"], world.org_b, today + timedelta(minutes=3), 100, "203.0.113.9")
    await _used(world, dev_key["id"], world.org_a, today - timedelta(days=40), 1000, "198.51.100.4")  # too old

    own = await ok(await client.get(f"/v1/keys/{dev_key['id']}/usage", headers=auth(dev_key)))
    assert (own["key_id"], own["days"], len(own["items"]), own["total"]) == (dev_key["id"], 30, 30, 114)
    assert own["items"][-1] == {"day": today.date().isoformat(), "requests": 107}
    assert own["items"][-3] == {"day": (today - timedelta(days=2)).date().isoformat(), "requests": 7}
    assert own["items"][0]["day"] == (today - timedelta(days=29)).date().isoformat()
    seen = await ok(await client.get(f"/v1/keys/{dev_key['id']}/usage?days=3", headers=auth(admin)))
    assert [d["requests"] for d in seen["items"]] == [7, 0, 7] and seen["total"] == 14  # org A's only
    longer = await ok(await client.get(f"/v1/keys/{dev_key['id']}/usage?days=90", headers=auth(dev_key)))
    assert longer["total"] == 1114

    # The last use: the owner's is the latest anywhere; the admin's, the latest in org A.
    mine = await ok(await client.get(f"/v1/keys/{dev_key['id']}", headers=auth(dev_key)))
    assert mine["last_used_ip"] == "203.0.113.9"
    theirs = await ok(await client.get(f"/v1/keys/{dev_key['id']}", headers=auth(admin)))
    assert theirs["last_used_ip"] == "198.51.100.2"
    assert theirs["last_used_at"] == (today + timedelta(minutes=2)).isoformat().replace("+00:00", "Z")
    # A '-' is in no key id: `q` cannot also match one by chance (`dev` once matched an id, 1 run in ~100).
    listed = await ok(await client.get(f"/v1/keys?org={world.org_a}&q=dev-lap", headers=auth(admin)))
    assert listed["items"] == [theirs]
    # An admin of both orgs sees the latest use in either, whichever org is read first.
    await world.directory.set_member(world.org_b, world.user, "admin")
    both_orgs = await world.key(name="both")
    first, second = sorted([world.org_a, world.org_b])
    await _used(world, dev_key["id"], first, today + timedelta(minutes=9), 1, "192.0.2.1")
    await _used(world, dev_key["id"], second, today + timedelta(minutes=8), 1, "192.0.2.2")
    seen_twice = await ok(await client.get(f"/v1/keys/{dev_key['id']}", headers=auth(both_orgs)))
    assert (seen_twice["last_used_ip"], seen_twice["orgs"]) == ("192.0.2.1", [first, second])

    # Nobody else: a member of org A, the key's owner asking about another's key, an admin of another org.
    await err(await client.get(f"/v1/keys/{admin['id']}/usage", headers=auth(dev_key)), 404, "not_found")
    stranger = (await world.directory.create_user("stranger@example.com"))["id"]
    org_c = (await world.directory.create_org("C"))["id"]
    await world.directory.set_member(org_c, stranger, "owner")
    stranger_key = await world.key(name="stranger", user=stranger, role="owner")
    await err(await client.get(f"/v1/keys/{dev_key['id']}/usage", headers=auth(stranger_key)), 404, "not_found")
    await err(await client.get("/v1/keys/nope/usage", headers=auth(admin)), 404, "not_found")
    for days in ("0", "91", "x", "-1", "1.5"):
        e = await err(
            await client.get(f"/v1/keys/{dev_key['id']}/usage?days={days}", headers=auth(dev_key)),
            400,
            "invalid_request",
        )
        assert e["error"]["field"] == "days"


async def test_invitations_and_audit_events_carry_names(client: Client, world: World) -> None:
    """Issue 13: ids where names belong. The invitee sees who invited them; the audit names actor, user and key."""
    admin = await world.key(name="admin", role="admin", orgs=[world.org_a])
    invited = await ok(
        await client.post(
            f"/v1/orgs/{world.org_a}/members", json={"email": "new@example.com", "role": "viewer"}, headers=auth(admin)
        ),
        202,
    )
    new_key = await world.key(name="new", user=invited["user_id"], role="owner")
    (mine,) = (await ok(await client.get("/v1/invitations", headers=auth(new_key))))["items"]
    assert (mine["invited_by"], mine["invited_by_name"]) == (world.user, "owner@example.com")
    created = await ok(
        await client.post(
            "/v1/keys", json={"name": "named", "role": "viewer", "orgs": [world.org_a]}, headers=auth(admin)
        ),
        201,
    )
    events = await ok(await client.get(f"/v1/orgs/{world.org_a}/audit?key_id={created['id']}", headers=auth(admin)))
    (event,) = events["items"]
    assert (event["actor_name"], event["user_name"], event["key_name"]) == (
        "owner@example.com",
        "owner@example.com",
        "named",
    )
    cli_events = await ok(await client.get(f"/v1/orgs/{world.org_a}/audit?actor=cli", headers=auth(admin)))
    assert all(e["actor_name"] is None for e in cli_events["items"])
