"""Orgs, users, memberships, projects and service accounts (gateway/directory.py), against Postgres."""

from __future__ import annotations

import asyncpg
import pytest

from gateway.audit import CLI
from gateway.config import RolesConfig
from gateway.data.db import Database
from gateway.directory import Directory
from gateway.errors import Conflict, InvalidRequest, NotFound
from gateway.keyring import KeySpec
from tests.conftest import World


async def test_an_org_always_keeps_an_owner(world: World) -> None:
    d = world.directory
    org = (await d.create_org("O", CLI, owner=world.user))["id"]
    assert await d.member_role(org, world.user) == "owner"
    with pytest.raises(Conflict, match="must keep an owner"):
        await d.remove_member(org, world.user)
    with pytest.raises(Conflict, match="must keep an owner"):
        await d.set_member(org, world.user, "admin")
    other = (await d.create_user("second@example.com"))["id"]
    await d.set_member(org, other, "owner")
    await d.set_member(org, world.user, "admin")  # now there is another owner
    assert await d.member_roles(world.user) == {world.org_a: "admin", world.org_b: "viewer", org: "admin"}


async def test_users_by_email(world: World) -> None:
    d = world.directory
    with pytest.raises(Conflict):
        await d.create_user("Owner@Example.com ")  # the world's owner, spelt otherwise
    assert await d.user_by_email(" OWNER@example.com", CLI) == world.user
    made = await d.user_by_email("new@example.com", CLI)
    assert made.startswith("usr_") and await d.user_by_email("new@example.com", CLI) == made
    with pytest.raises(InvalidRequest) as refused:
        await d.user_by_email("not an address", CLI)
    assert refused.value.field == "email"


async def test_a_membership_change_invalidates_every_key_of_the_member(pool: asyncpg.Pool, world: World) -> None:
    k1 = await world.key(name="one", orgs=[world.org_a])
    k2 = await world.key(name="two", orgs=[world.org_b])
    got: list[list[str]] = []
    d = Directory(Database(pool, on_invalidate=got.append), RolesConfig())
    await d.set_member(world.org_b, world.user, "member")
    assert sorted(got[0]) == sorted([k1["id"], k2["id"]])
    with pytest.raises(NotFound):
        await d.remove_member(world.org_b, "usr_nobody")


async def test_deleting_a_project_its_keys_name(world: World) -> None:
    d, keyring = world.directory, world.keyring
    project = (await d.create_project(world.org_a, "web"))["id"]
    only_here = await world.key(name="here", orgs=[world.org_a], projects=[project])
    await d.set_member(world.org_b, world.user, "admin")
    spread = await keyring.create_key(
        KeySpec(user_id=world.user, name="spread", role="admin", orgs=[], projects=[project], scopes=None)
    )
    with pytest.raises(Conflict, match="2 active keys name this project"):
        await d.delete_project(world.org_a, project, False, CLI)
    done = await d.delete_project(world.org_a, project, True, CLI)
    assert sorted(done["revoked_keys"]) == sorted([only_here["id"], spread["id"]])
    assert (await keyring.show_key(only_here["id"]))["status"] == "revoked"  # it acted in this org alone
    assert (await keyring.show_key(spread["id"]))["status"] == "active"  # its owner's other orgs are not ours
    assert await keyring.stopped_in(spread["id"]) == [world.org_a]
    assert await d.projects(world.org_a) == []


async def test_service_accounts_belong_to_one_org(world: World) -> None:
    d = world.directory
    sa = await d.create_service_account(world.org_a, "ci", "member", CLI)
    assert sa["id"].startswith("svc_") and await d.service_org(sa["id"]) == world.org_a
    assert await d.service_org(world.user) is None
    assert [s["id"] for s in await d.service_accounts(world.org_a)] == [sa["id"]]
    assert await d.service_accounts(world.org_b) == []
    assert await d.member_role(world.org_a, sa["id"]) == "member"
    with pytest.raises(InvalidRequest):
        await d.create_service_account(world.org_a, "bad", "root", CLI)
