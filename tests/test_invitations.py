"""Joining an org is the joining user's choice, and an org's admins manage only their own org.

Before: any all-orgs key could create org M, add a victim by email and at once see the victim's keys
(with org B's id and role), revoke them everywhere (the victim lost org B), and break the victim's
all-orgs key in org B (`org_required`)."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from gateway.audit import CLI, AuditLog
from gateway.data.db import Database
from gateway.errors import InvalidRequest
from gateway.invitations import Invitations
from tests.conftest import Client, World, nginx_headers, poll
from tests.test_api import auth, err, ok


async def _victim(world: World) -> tuple[str, dict[str, Any]]:
    """A user who is a member of org B only, with an all-orgs key."""
    victim = (await world.directory.create_user("victim@example.com"))["id"]
    await world.directory.set_member(world.org_b, victim, "admin")
    return victim, await world.key(name="victim", user=victim, role="admin")


async def _attacker_org(client: Client, world: World) -> tuple[dict[str, Any], str]:
    attacker = (await world.directory.create_user("mallory@example.com"))["id"]
    key = await world.key(name="mallory", user=attacker, role="owner")
    org = (await ok(await client.post("/v1/orgs", json={"name": "M"}, headers=auth(key)), 201))["id"]
    return key, org


async def _verify(client: Client, key: dict[str, Any], org: str | None = None) -> Any:
    extra = {"X-Org-Id": org} if org else {}
    return await client.get("/auth/nginx", headers=nginx_headers(key["key"], **extra))


async def test_adding_a_user_is_an_invitation_that_changes_nothing_until_accepted(client: Client, world: World) -> None:
    victim, victim_key = await _victim(world)
    mallory, m_org = await _attacker_org(client, world)
    inv = await ok(
        await client.post(
            f"/v1/orgs/{m_org}/members", json={"email": "victim@example.com", "role": "viewer"}, headers=auth(mallory)
        ),
        202,
    )
    assert (inv["status"], inv["user_id"], inv["org_id"]) == ("pending", victim, m_org)
    # The victim is no member of M, and their key acts exactly as before: without naming an org too.
    assert await world.directory.member_role(m_org, victim) is None
    r = await _verify(client, victim_key)
    assert (r.status, r.headers["X-Org"]) == (200, world.org_b)
    # M's owner sees nothing of the victim's keys, and cannot touch them.
    listed = await ok(await client.get(f"/v1/keys?org={m_org}", headers=auth(mallory)))
    assert [k["id"] for k in listed["items"]] == [mallory["id"]]
    await err(await client.get(f"/v1/keys/{victim_key['id']}", headers=auth(mallory)), 404, "not_found")
    await err(await client.post(f"/v1/keys/{victim_key['id']}/revoke", headers=auth(mallory)), 404, "not_found")
    assert (await _verify(client, victim_key, world.org_b)).status == 200
    # The org lists its open invitation; the victim sees theirs.
    pending = await ok(await client.get(f"/v1/orgs/{m_org}/invitations", headers=auth(mallory)))
    assert [i["id"] for i in pending["items"]] == [inv["id"]]
    mine = await ok(await client.get("/v1/invitations", headers=auth(victim_key)))
    assert [(i["id"], i["org_name"], i["role"]) for i in mine["items"]] == [(inv["id"], "M", "viewer")]
    # Nobody else can accept it for them.
    await err(await client.post(f"/v1/invitations/{inv['id']}/accept", headers=auth(mallory)), 404, "not_found")
    # Declined: still nothing changed.
    declined = await ok(await client.post(f"/v1/invitations/{inv['id']}/decline", headers=auth(victim_key)))
    assert declined["status"] == "declined"
    assert await world.directory.member_role(m_org, victim) is None
    await err(await client.post(f"/v1/invitations/{inv['id']}/accept", headers=auth(victim_key)), 409, "conflict")
    assert (await ok(await client.get("/v1/invitations", headers=auth(victim_key))))["items"] == []


async def test_after_joining_an_admin_can_stop_a_key_only_in_their_org(client: Client, world: World) -> None:
    victim, victim_key = await _victim(world)
    b_project = await world.directory.create_project(world.org_b, "secret-b")
    scoped = await world.key(name="scoped", user=victim, role="admin", projects=[b_project["id"]])
    mallory, m_org = await _attacker_org(client, world)
    body = {"email": "victim@example.com", "role": "member"}
    inv = await ok(await client.post(f"/v1/orgs/{m_org}/members", json=body, headers=auth(mallory)), 202)
    await ok(await client.post(f"/v1/invitations/{inv['id']}/accept", headers=auth(victim_key)))
    assert await world.directory.member_role(m_org, victim) == "member"
    # Naming org B, the all-orgs key works as before (without a name, two orgs now need one).
    assert (await _verify(client, victim_key, world.org_b)).status == 200
    assert (await _verify(client, victim_key, m_org)).headers.get("X-Role") == "member"
    # M's owner sees the victim's keys as they act in M only: no org B id, role or project.
    listed = await ok(await client.get(f"/v1/keys?org={m_org}", headers=auth(mallory)))
    seen = {k["id"]: k for k in listed["items"]}
    assert set(seen) == {mallory["id"], victim_key["id"], scoped["id"]}
    for key_id in (victim_key["id"], scoped["id"]):
        assert seen[key_id]["orgs"] == [m_org]
        assert set(seen[key_id]["effective_role"]) == {m_org}
        assert world.org_b not in str(seen[key_id]) and b_project["id"] not in str(seen[key_id])
    shown = await ok(await client.get(f"/v1/keys/{victim_key['id']}", headers=auth(mallory)))
    assert world.org_b not in str(shown)
    # Revoking it stops it in M, and nowhere else.
    stopped = await ok(await client.post(f"/v1/keys/{victim_key['id']}/revoke", headers=auth(mallory)))
    assert stopped["revoked_in"] == [m_org]
    r = await poll(lambda: _verify(client, victim_key, m_org), lambda r: r.status != 200)
    assert (r.status, r.headers["X-Auth-Error"]) == (403, "org_not_allowed")
    assert (await _verify(client, victim_key, world.org_b)).status == 200
    assert await world.directory.member_role(world.org_b, victim) == "admin"
    own = await ok(await client.get(f"/v1/keys/{victim_key['id']}", headers=auth(victim_key)))
    assert (own["status"], own["stopped_in"]) == ("active", [m_org])
    assert world.org_b in own["effective_role"] and m_org not in own["effective_role"]
    # No longer acting in M, it is gone from M's listing.
    listed = await ok(await client.get(f"/v1/keys?org={m_org}", headers=auth(mallory)))
    assert victim_key["id"] not in [k["id"] for k in listed["items"]]


async def test_a_key_confined_to_some_orgs_cannot_accept(client: Client, world: World) -> None:
    victim, _ = await _victim(world)
    confined = await world.key(name="confined", user=victim, role="admin", orgs=[world.org_b])
    mallory, m_org = await _attacker_org(client, world)
    body = {"email": "victim@example.com", "role": "viewer"}
    inv = await ok(await client.post(f"/v1/orgs/{m_org}/members", json=body, headers=auth(mallory)), 202)
    await err(await client.post(f"/v1/invitations/{inv['id']}/accept", headers=auth(confined)), 403, "org_not_allowed")
    assert await world.directory.member_role(m_org, victim) is None


async def test_invitations_expire_and_can_be_withdrawn(client: Client, world: World, pool: asyncpg.Pool) -> None:
    victim, victim_key = await _victim(world)
    k = await world.key(name="a", role="admin")
    body = {"email": "victim@example.com", "role": "viewer"}
    inv = await ok(await client.post(f"/v1/orgs/{world.org_a}/members", json=body, headers=auth(k)), 202)
    # Inviting again renews the one open invitation.
    again = await ok(
        await client.post(f"/v1/orgs/{world.org_a}/members", json={**body, "role": "member"}, headers=auth(k)),
        202,
    )
    assert (again["id"], again["role"]) == (inv["id"], "member")
    async with pool.acquire() as conn:
        await conn.execute("UPDATE invitations SET expires_at = now() - interval '1 second' WHERE id = $1", inv["id"])
    assert (await ok(await client.get("/v1/invitations", headers=auth(victim_key))))["items"] == []
    assert (await ok(await client.get(f"/v1/orgs/{world.org_a}/invitations", headers=auth(k))))["items"] == []
    await err(await client.post(f"/v1/invitations/{inv['id']}/accept", headers=auth(victim_key)), 409, "conflict")
    assert await world.directory.member_role(world.org_a, victim) is None
    # A new invitation, withdrawn by the org's admin before the user accepts.
    fresh = await ok(await client.post(f"/v1/orgs/{world.org_a}/members", json=body, headers=auth(k)), 202)
    assert fresh["id"] != inv["id"]
    withdrawn = await ok(await client.delete(f"/v1/orgs/{world.org_a}/invitations/{fresh['id']}", headers=auth(k)))
    assert withdrawn["status"] == "revoked"
    await err(await client.post(f"/v1/invitations/{fresh['id']}/accept", headers=auth(victim_key)), 409, "conflict")
    # An admin of another org cannot withdraw it.
    other = await ok(await client.post(f"/v1/orgs/{world.org_a}/members", json=body, headers=auth(k)), 202)
    await err(
        await client.delete(f"/v1/orgs/{world.org_b}/invitations/{other['id']}", headers=auth(victim_key)),
        404,
        "not_found",
    )
    events = [e["type"] for e in await AuditLog(Database(pool)).events(world.org_a)]
    assert {"invitation.created", "invitation.revoked"} <= set(events)


async def _joined(client: Client, world: World) -> tuple[str, dict[str, Any], dict[str, Any], str]:
    """The victim (admin of B, with an all-orgs key) has joined Mallory's org M as a member."""
    victim, victim_key = await _victim(world)
    mallory, m_org = await _attacker_org(client, world)
    body = {"email": "victim@example.com", "role": "member"}
    inv = await ok(await client.post(f"/v1/orgs/{m_org}/members", json=body, headers=auth(mallory)), 202)
    await ok(await client.post(f"/v1/invitations/{inv['id']}/accept", headers=auth(victim_key)))
    return victim, victim_key, mallory, m_org


async def test_a_stopped_key_cannot_mint_its_way_back(client: Client, world: World) -> None:
    """Found by review: a key stopped in an org created an all-orgs key, or rotated itself, and the new key
    acted in that org again."""
    victim, victim_key, mallory, m_org = await _joined(client, world)
    m_only = await world.key(name="m-only", user=victim, role="member", orgs=[m_org])
    await ok(await client.post(f"/v1/keys/{victim_key['id']}/revoke", headers=auth(mallory)))
    await poll(lambda: _verify(client, victim_key, m_org), lambda r: r.status == 403)
    child = await ok(
        await client.post("/v1/keys", json={"name": "child", "role": "member"}, headers=auth(victim_key)), 201
    )
    assert child["stopped_in"] == [m_org]
    assert (await _verify(client, child, m_org)).status == 403
    assert (await _verify(client, child, world.org_b)).status == 200
    body = {"name": "m", "role": "member", "orgs": [m_org]}
    r = await client.post("/v1/keys", json=body, headers=auth(victim_key))
    assert r.status in (403, 404), await r.text()
    # Nor can it act on the user's keys for that org.
    await err(await client.post(f"/v1/keys/{m_only['id']}/revoke", headers=auth(victim_key)), 403, "org_not_allowed")
    rotated = await ok(await client.post(f"/v1/keys/{victim_key['id']}/rotate", json={}, headers=auth(victim_key)), 201)
    assert rotated["stopped_in"] == [m_org]
    assert (await _verify(client, rotated, m_org)).status == 403
    assert (await _verify(client, rotated, world.org_b)).status == 200


async def test_deleting_a_project_stops_its_keys_in_that_org_only(client: Client, world: World) -> None:
    """Found by review: deleting a project with revoke_keys=true revoked keys naming it everywhere,
    including keys of members above the caller."""
    victim, _, mallory, m_org = await _joined(client, world)
    p_m = await ok(await client.post(f"/v1/orgs/{m_org}/projects", json={"name": "m"}, headers=auth(mallory)), 201)
    p_b = await world.directory.create_project(world.org_b, "b")
    both = await world.key(name="both", user=victim, role="member", projects=[p_m["id"], p_b["id"]])
    here = await world.key(name="here", user=victim, role="member", orgs=[m_org], projects=[p_m["id"]])
    url = f"/v1/orgs/{m_org}/projects/{p_m['id']}?revoke_keys=true"
    gone = await ok(await client.delete(url, headers=auth(mallory)))
    assert sorted(gone["revoked_keys"]) == sorted([both["id"], here["id"]])
    assert (await world.keyring.show_key(here["id"]))["status"] == "revoked"  # it could act only in M
    assert (await world.keyring.show_key(both["id"]))["status"] == "active"
    assert (await _verify(client, both, m_org)).status == 403
    r = await client.get("/auth/nginx", headers=nginx_headers(both["key"], **{"X-Org-Id": world.org_b}))
    assert r.status == 200
    # A key of a member above the caller is not the caller's to stop.
    boss = (await world.directory.create_user("boss@example.com"))["id"]
    await world.directory.set_member(world.org_a, boss, "owner")
    p_a = await world.directory.create_project(world.org_a, "a")
    boss_key = await world.key(name="boss", user=boss, role="owner", orgs=[world.org_a], projects=[p_a["id"]])
    a_admin = await world.key(name="a-admin", role="admin", orgs=[world.org_a])
    url = f"/v1/orgs/{world.org_a}/projects/{p_a['id']}?revoke_keys=true"
    await err(await client.delete(url, headers=auth(a_admin)), 403, "insufficient_permissions")
    assert (await world.keyring.show_key(boss_key["id"]))["status"] == "active"


async def test_an_org_learns_nothing_of_a_members_doings_elsewhere(client: Client, world: World) -> None:
    """Found by review: M's audit held the victim's address, browser and key id when they declined, and
    M saw the last use of a key that acts in other orgs."""
    _, victim_key = await _victim(world)
    mallory, m_org = await _attacker_org(client, world)
    body = {"email": "victim@example.com", "role": "member"}
    inv = await ok(await client.post(f"/v1/orgs/{m_org}/members", json=body, headers=auth(mallory)), 202)
    headers = {**auth(victim_key), "User-Agent": "VictimBrowser/9", "X-Forwarded-For": "203.0.113.77"}
    await ok(await client.post(f"/v1/invitations/{inv['id']}/decline", headers=headers))
    events = await ok(await client.get(f"/v1/orgs/{m_org}/audit?type=invitation.declined", headers=auth(mallory)))
    (event,) = events["items"]
    assert event["ip"] is None and event["user_agent"] is None and victim_key["id"] not in str(event)
    inv = await ok(await client.post(f"/v1/orgs/{m_org}/members", json=body, headers=auth(mallory)), 202)
    await ok(await client.post(f"/v1/invitations/{inv['id']}/accept", headers=auth(victim_key)))
    assert (await _verify(client, victim_key, world.org_b)).status == 200
    for _ in range(100):  # last use is flushed in the background
        if (await world.keyring.show_key(victim_key["id"]))["last_used_at"] is not None:
            break
        await asyncio.sleep(0.05)
    assert (await world.keyring.show_key(victim_key["id"]))["last_used_at"] is not None
    seen = await ok(await client.get(f"/v1/keys/{victim_key['id']}", headers=auth(mallory)))
    assert seen["last_used_at"] is None


async def test_an_invitation_dies_with_its_senders_power(client: Client, world: World) -> None:
    """Found by review: an admin removed from the org left invitations behind that still made admins."""
    rogue = (await world.directory.create_user("rogue@example.com"))["id"]
    await world.directory.set_member(world.org_a, rogue, "admin")
    rogue_key = await world.key(name="rogue", user=rogue, role="admin", orgs=[world.org_a])
    alt = (await world.directory.create_user("alt@example.com"))["id"]
    alt_key = await world.key(name="alt", user=alt, role="owner")
    body = {"email": "alt@example.com", "role": "admin"}
    inv = await ok(await client.post(f"/v1/orgs/{world.org_a}/members", json=body, headers=auth(rogue_key)), 202)
    await world.directory.remove_member(world.org_a, rogue)
    await err(await client.post(f"/v1/invitations/{inv['id']}/accept", headers=auth(alt_key)), 409, "conflict")
    assert await world.directory.member_role(world.org_a, alt) is None


async def test_an_org_listing_skips_keys_of_members_who_left(client: Client, world: World) -> None:
    """Found by review: once a member with an org-scoped key left, the org's key listing answered 404."""
    dev = (await world.directory.create_user("dev@example.com"))["id"]
    await world.directory.set_member(world.org_a, dev, "member")
    dev_key = await world.key(name="dev", user=dev, role="member", orgs=[world.org_a])
    k = await world.key(name="a", role="admin")
    await world.directory.remove_member(world.org_a, dev)
    for query in ("", "&status=active"):
        listed = await ok(await client.get(f"/v1/keys?org={world.org_a}{query}", headers=auth(k)))
        assert dev_key["id"] not in [x["id"] for x in listed["items"]]


async def test_an_invitation_with_an_unknown_role_leaves_nothing_behind(world: World, pool: asyncpg.Pool) -> None:
    """The role is checked before anything is written: before, the invited user was created first."""
    with pytest.raises(InvalidRequest) as refused:
        await Invitations(world.directory).invite(world.org_a, "ghost@example.com", "root", CLI)
    assert refused.value.field == "role"
    assert await pool.fetchval("SELECT count(*) FROM users WHERE email = 'ghost@example.com'") == 0
