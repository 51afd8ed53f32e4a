"""Every /v1/ action is bounded by the calling credential's own effective permissions in the org (CONTRACT
section 7): its role capped by its owner's membership, met with its scopes, exactly as forward auth
computes X-Scopes. Before, management calls looked at the owner's membership role only, so a read-only
key could add admins and a viewer-role key could revoke its owner's keys."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.audit import CLI
from gateway.invitations import Invitations
from tests.conftest import Client, World, nginx_headers
from tests.test_api import auth, err, ok

# action: (method, path, body, permission, needs an admin role). `{org}` and the other names are filled
# from the objects of the org the credential acts in.
ACTIONS: dict[str, tuple[str, str, dict[str, Any] | None, str, bool]] = {
    "list the org's keys": ("GET", "/v1/keys?org={org}", None, "keys:read", True),
    "show a member's key": ("GET", "/v1/keys/{dev_key}", None, "keys:read", True),
    "revoke a member's key": ("POST", "/v1/keys/{dev_key}/revoke", None, "keys:write", True),
    "rotate a service account's key": ("POST", "/v1/keys/{sa_key}/rotate", {}, "keys:write", True),
    "list members": ("GET", "/v1/orgs/{org}/members", None, "members:read", True),
    "invite a member": (
        "POST",
        "/v1/orgs/{org}/members",
        {"email": "m@example.com", "role": "viewer"},
        "members:write",
        True,
    ),
    "change a member's role": ("PUT", "/v1/orgs/{org}/members/{dev}", {"role": "viewer"}, "members:write", True),
    "remove a member": ("DELETE", "/v1/orgs/{org}/members/{dev}", None, "members:write", True),
    "list invitations": ("GET", "/v1/orgs/{org}/invitations", None, "members:read", True),
    "withdraw an invitation": ("DELETE", "/v1/orgs/{org}/invitations/{invitation}", None, "members:write", True),
    "create a project": ("POST", "/v1/orgs/{org}/projects", {"name": "new"}, "projects:write", True),
    "list projects": ("GET", "/v1/orgs/{org}/projects", None, "projects:read", False),
    "show a project": ("GET", "/v1/orgs/{org}/projects/{project}", None, "projects:read", False),
    "delete a project": ("DELETE", "/v1/orgs/{org}/projects/{project}", None, "projects:write", True),
    "create a service account": (
        "POST",
        "/v1/orgs/{org}/service-accounts",
        {"name": "bot", "role": "viewer"},
        "service_accounts:write",
        True,
    ),
    "list service accounts": ("GET", "/v1/orgs/{org}/service-accounts", None, "service_accounts:read", True),
    "issue a service account key": (
        "POST",
        "/v1/orgs/{org}/service-accounts/{sa}/keys",
        {"name": "k", "role": "viewer"},
        "service_accounts:write",
        True,
    ),
    "read the audit": ("GET", "/v1/orgs/{org}/audit", None, "audit:read", True),
}

# Actions that hand out a role: the credential's permissions must also cover all the role may do.
GRANTING = {"invite a member", "change a member's role"}

# The owner of the credentials is an admin of org A and a viewer of org B.
# credential: (role, scopes, the org it acts in, which permissions it has there, effective role >= admin)
CREDENTIALS: dict[str, tuple[str, list[str] | None, str, set[str] | None, bool]] = {
    # A viewer-role key: the role grants *:read, and no admin power.
    "viewer key": ("viewer", None, "A", {"projects:read"}, False),
    # An owner-role key scoped to one permission outside management: nothing.
    "scoped key": ("owner", ["calls:read"], "A", set(), True),
    # An owner-role key acting in org B, where its owner is a viewer: capped to viewer.
    "capped key": ("owner", None, "B", {"projects:read"}, False),
    # An admin key scoped to members: only the member actions, and no granting a role (even a viewer's
    # `*:read` is more than `members:*`).
    "members-only key": ("admin", ["members:*"], "A", {"members:read", "members:write"}, True),
    # The control: an admin key without scopes may do everything here.
    "admin key": ("admin", None, "A", None, True),
}


async def _org_objects(world: World, client: Client, org: str) -> dict[str, str]:
    """A member with a key, a service account with a key, a project and an invitation, in `org`."""
    directory = world.directory
    dev = (await directory.create_user(f"dev-{org}@example.com"))["id"]
    await directory.set_member(org, dev, "member")
    dev_key = await world.key(name="dev", user=dev, role="member", orgs=[org])
    sa = await directory.create_service_account(org, "ci", "member", CLI)
    sa_key = await world.key(name="sa", user=sa["id"], role="member", orgs=[org])
    project = await directory.create_project(org, "web")
    invitation = await Invitations(directory).invite(org, f"inv-{org}@example.com", "viewer", CLI)
    return {
        "org": org,
        "dev": dev,
        "dev_key": dev_key["id"],
        "sa": sa["id"],
        "sa_key": sa_key["id"],
        "project": project["id"],
        "invitation": invitation["id"],
    }


@pytest.mark.parametrize("action", list(ACTIONS))
@pytest.mark.parametrize("credential", list(CREDENTIALS))
async def test_each_action_needs_its_permission(client: Client, world: World, action: str, credential: str) -> None:
    method, template, body, permission, needs_admin = ACTIONS[action]
    role, scopes, where, granted, is_admin = CREDENTIALS[credential]
    org = world.org_a if where == "A" else world.org_b
    names = await _org_objects(world, client, org)
    key = await world.key(name="caller", role=role, scopes=scopes)
    allowed = (granted is None or permission in granted) and (is_admin or not needs_admin)
    allowed = allowed and (action not in GRANTING or granted is None)
    r = await client.request(method, template.format(**names), json=body, headers=auth(key))
    data = await r.json()
    if allowed:
        assert 200 <= r.status < 300, (credential, action, data)
        return
    assert (r.status, data["error"]["code"]) in ((403, "insufficient_permissions"), (404, "not_found")), data
    # And nothing changed: the org's admin (the CLI here) still sees everything as it was.
    assert await world.directory.member_role(org, names["dev"]) == "member"
    assert (await world.keyring.show_key(names["dev_key"]))["status"] == "active"
    assert (await world.keyring.show_key(names["sa_key"]))["rotated_to"] is None
    assert [p["id"] for p in await world.directory.projects(org)] == [names["project"]]
    assert [i["id"] for i in await Invitations(world.directory).for_org(org)] == [names["invitation"]]
    assert [sa["id"] for sa in await world.directory.service_accounts(org)] == [names["sa"]]


async def test_a_read_only_key_cannot_make_anyone_an_admin(client: Client, world: World) -> None:
    """The issue's case: Alice's owner-role key scoped to calls:read added Mallory as an admin (201), and
    Mallory's key then got X-Role: admin, X-Scopes: *."""
    alice = await world.key(name="alice", role="owner", scopes=["calls:read"])
    mallory = (await world.directory.create_user("mallory@example.com"))["id"]
    mallory_key = await world.key(name="mallory", user=mallory, role="owner")
    body = {"email": "mallory@example.com", "role": "admin"}
    await err(
        await client.post(f"/v1/orgs/{world.org_a}/members", json=body, headers=auth(alice)),
        403,
        "insufficient_permissions",
    )
    assert await world.directory.member_role(world.org_a, mallory) is None
    assert await Invitations(world.directory).for_user(mallory) == []
    r = await client.get("/auth/nginx", headers=nginx_headers(mallory_key["key"], **{"X-Org-Id": world.org_a}))
    assert r.status == 403 and r.headers.get("X-Role") is None


@pytest.mark.parametrize(
    ("role", "scopes"), [("owner", ["calls:read"]), ("viewer", None), ("member", None), ("admin", ["keys:*"])]
)
async def test_a_weaker_key_cannot_revoke_its_owners_stronger_keys(
    client: Client, world: World, role: str, scopes: list[str] | None
) -> None:
    """Before, a read-only key and a viewer-role key revoked their owner's owner-role key (200). A key acts
    on its owner's own keys only within its own power: it can revoke itself, and keys no stronger."""
    strong = await world.key(name="strong", role="owner")
    weak = await world.key(name="weak", role=role, scopes=scopes)
    await err(await client.post(f"/v1/keys/{strong['id']}/revoke", headers=auth(weak)), 403, "insufficient_permissions")
    assert (await world.keyring.show_key(strong["id"]))["status"] == "active"
    weaker = await world.key(name="weaker", role="viewer", scopes=scopes or ["calls:read"])
    assert (await ok(await client.post(f"/v1/keys/{weaker['id']}/revoke", headers=auth(weak))))["status"] == "revoked"
    assert (await ok(await client.post(f"/v1/keys/{weak['id']}/revoke", headers=auth(weak))))["status"] == "revoked"


@pytest.mark.parametrize(
    ("role", "scopes", "status"),
    [("viewer", None, 403), ("member", None, 201), ("owner", ["calls:read"], 403), ("owner", ["orgs:write"], 201)],
)
async def test_creating_an_org_needs_orgs_write(
    client: Client, world: World, role: str, scopes: list[str] | None, status: int
) -> None:
    k = await world.key(name="k", role=role, scopes=scopes)
    r = await client.post("/v1/orgs", json={"name": "New"}, headers=auth(k))
    if status == 201:
        await ok(r, 201)
    else:
        await err(r, 403, "insufficient_permissions")


async def test_an_admin_cannot_stop_the_key_of_a_member_above_them(client: Client, world: World) -> None:
    boss = (await world.directory.create_user("boss@example.com"))["id"]
    await world.directory.set_member(world.org_a, boss, "owner")
    boss_key = await world.key(name="boss", user=boss, role="owner", orgs=[world.org_a])
    admin_key = await world.key(name="admin", role="admin")
    r = await client.post(f"/v1/keys/{boss_key['id']}/revoke", headers=auth(admin_key))
    await err(r, 403, "insufficient_permissions")
    assert (await world.keyring.show_key(boss_key["id"]))["status"] == "active"


async def test_a_scoped_key_grants_only_roles_within_its_scopes(client: Client, world: World) -> None:
    """Before, an admin key scoped to members:* could invite an account as admin, which then had all an
    admin has. A role is granted only when the key's own permissions cover everything the role may do."""
    k = await world.key(name="k", role="admin", scopes=["members:*", "*:read"])
    url = f"/v1/orgs/{world.org_a}/members"
    await ok(await client.post(url, json={"email": "v@example.com", "role": "viewer"}, headers=auth(k)), 202)
    for role in ("member", "admin"):
        r = await client.post(url, json={"email": f"{role}@example.com", "role": role}, headers=auth(k))
        await err(r, 403, "insufficient_permissions")


async def test_a_key_confined_to_projects_manages_only_those(client: Client, world: World) -> None:
    """Found by review: an admin key confined to p1 read, deleted and created other projects."""
    p1 = await world.directory.create_project(world.org_a, "p1")
    p2 = await world.directory.create_project(world.org_a, "p2")
    k = await world.key(name="k", role="admin", orgs=[world.org_a], projects=[p1["id"]])
    base = f"/v1/orgs/{world.org_a}/projects"
    assert [p["id"] for p in (await ok(await client.get(base, headers=auth(k))))["items"]] == [p1["id"]]
    await ok(await client.get(f"{base}/{p1['id']}", headers=auth(k)))
    await err(await client.get(f"{base}/{p2['id']}", headers=auth(k)), 404, "not_found")
    await err(await client.delete(f"{base}/{p2['id']}", headers=auth(k)), 404, "not_found")
    await err(await client.post(base, json={"name": "p3"}, headers=auth(k)), 403, "project_not_allowed")
    assert len(await world.directory.projects(world.org_a)) == 2


async def test_a_service_account_key_is_handed_out_once_made(client: Client, world: World) -> None:
    """Found by review: a key scoped to service_accounts:* made the key, then answered 404 without it."""
    k = await world.key(name="k", role="admin", scopes=["service_accounts:*", "*:read"])
    sa = await ok(
        await client.post(
            f"/v1/orgs/{world.org_a}/service-accounts", json={"name": "ci", "role": "viewer"}, headers=auth(k)
        ),
        201,
    )
    made = await ok(
        await client.post(
            f"/v1/orgs/{world.org_a}/service-accounts/{sa['id']}/keys",
            json={"name": "deploy", "role": "viewer", "scopes": ["*:read"]},
            headers=auth(k),
        ),
        201,
    )
    assert made["key"].startswith("gw_live_") and made["effective_role"] == {world.org_a: "viewer"}


@pytest.mark.parametrize("cursor", ["WzEsIDJd", "ImFiYyI", "MWUrMzA", "OTk5OTk5OTk5OTk5OTk5OTk5OTk5", "LTE"])
async def test_a_forged_audit_cursor_is_a_bad_request(client: Client, world: World, cursor: str) -> None:
    """Found by review: a cursor of [1,2], "abc", 1e30 or a huge number answered 503 with a traceback."""
    k = await world.key(name="k", role="admin")
    r = await client.get(f"/v1/orgs/{world.org_a}/audit?cursor={cursor}", headers=auth(k))
    await err(r, 400, "invalid_request")
