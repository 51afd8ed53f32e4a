"""API keys as the keyring keeps them (gateway/keyring.py), against a real Postgres."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gateway.audit import CLI
from gateway.errors import Conflict, InvalidRequest, NotFound
from gateway.keyring import MAX_LIST, KeyQuery, Keyring, KeySpec
from gateway.keys import KeyFormat
from tests.conftest import World


def spec(world: World, **over: Any) -> KeySpec:
    base: dict[str, Any] = {
        "user_id": world.user,
        "name": "k",
        "role": "admin",
        "orgs": [world.org_a],
        "projects": [],
        "scopes": None,
    }
    return KeySpec(**(base | over))


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"env": "prod"}, "env"),
        ({"role": "root"}, "role"),
        ({"name": " "}, "name"),
        ({"scopes": ["Calls:Read"]}, "scopes"),
        ({"allow_ips": ["10.0.0.0/33"]}, "allowed_ips"),
        ({"orgs": [f"org_{i}" for i in range(MAX_LIST + 1)]}, "orgs"),
        ({"expires_in": "30d", "expires_at": "2099-01-01T00:00:00Z"}, "expires_at"),
        ({"expires_at": "2001-01-01T00:00:00Z"}, "expires_at"),
        ({"expires_in": "soon"}, "expires_in"),
    ],
)
def test_a_spec_is_checked_field_by_field(world: World, over: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        world.keyring.validate_spec(spec(world, **over))
    assert refused.value.field == field


def test_a_checked_spec_carries_what_the_check_worked_out(world: World) -> None:
    checked = world.keyring.validate_spec(spec(world, allow_ips=["10.1.2.3", "10.0.0.0/8"], expires_in="1h"))
    assert checked.cidrs == ["10.1.2.3/32", "10.0.0.0/8"]
    assert checked.expires is not None
    assert timedelta(minutes=59) < checked.expires - datetime.now(UTC) <= timedelta(hours=1)


async def test_minting_shows_the_key_once_and_keeps_only_its_hash(world: World) -> None:
    row, raw = await world.keyring.mint(world.keyring.validate_spec(spec(world)), CLI)
    parsed = KeyFormat("gw").parse(raw)
    assert parsed is not None and parsed.key_id == row.id
    assert raw not in repr(row) and parsed.secret not in repr(row)
    stored = await world.pool.fetchval("SELECT secret_hash FROM api_keys WHERE id = $1", row.id)
    assert stored.startswith("$argon2id$") and parsed.secret not in stored
    assert (await world.keyring.show_key(row.id))["status"] == "active"


async def test_minting_checks_the_user_and_the_projects(world: World) -> None:
    with pytest.raises(NotFound):
        await world.keyring.create_key(spec(world, user_id="usr_nobody"))
    other = (await world.directory.create_project(world.org_b, "elsewhere"))["id"]
    with pytest.raises(InvalidRequest, match="not in the key's orgs"):
        await world.keyring.create_key(spec(world, projects=[other]))


async def test_rotation_keeps_the_spec_and_the_stops_and_ends_the_old_key(world: World) -> None:
    keyring: Keyring = world.keyring
    old = await keyring.create_key(spec(world, orgs=[], scopes=["calls:read"]))
    await keyring.stop_key_in(old["id"], [world.org_b], CLI)
    new = await keyring.rotate_key(old["id"], "1h", CLI)
    assert new["rotated_from"] == old["id"] and new["key"] != old["key"]
    assert (new["scopes"], new["orgs"], new["role"]) == (["calls:read"], "all", "admin")
    assert await keyring.stopped_in(new["id"]) == [world.org_b]  # no way back in through rotation
    ended = await keyring.show_key(old["id"])
    assert ended["rotated_to"] == new["id"] and ended["status"] == "active"  # within its hour of grace
    await keyring.revoke_key(new["id"], CLI)
    with pytest.raises(Conflict, match="revoked"):
        await keyring.rotate_key(new["id"], None, CLI)


def names(rows: list[dict[str, Any]]) -> list[str]:
    return sorted(r["name"] for r in rows)


async def test_listing_filters_by_owner_org_and_status(world: World) -> None:
    keyring = world.keyring
    a = await keyring.create_key(spec(world, name="a"))
    b = await keyring.create_key(spec(world, name="b", orgs=[]))
    c = await keyring.create_key(spec(world, name="c"))
    await keyring.revoke_key(c["id"], CLI)
    await keyring.stop_key_in(b["id"], [world.org_a], CLI)
    assert names(await keyring.list_keys(KeyQuery(world.user))) == ["a", "b", "c"]
    assert names(await keyring.list_keys(KeyQuery(world.user, status="active"))) == ["a", "b"]
    assert names(await keyring.list_keys(KeyQuery(world.user, status="revoked"))) == ["c"]
    assert names(await keyring.list_keys(KeyQuery(org=world.org_a))) == ["a", "c"]  # b was stopped there
    assert names(await keyring.list_keys(KeyQuery(org=world.org_b))) == ["b"]
    first = (await keyring.key_rows(KeyQuery(world.user, limit=1)))[0]
    after = await keyring.list_keys(KeyQuery(world.user, after=(first.created_at, first.id)))
    assert names(after) == ["b", "c"] and a["id"] == first.id


async def test_an_allowlist_reads_back_as_it_was_checked(world: World) -> None:
    """Review of the data layer: read as Postgres spells networks (::text), an IPv6 network holding an IPv4
    part came back spelt otherwise than at creation (as before the layer, Python's spelling is kept)."""
    ips = ["::ffff:1.2.3.0/120", "10.0.0.0/8", "2001:db8::/32"]
    checked = world.keyring.validate_spec(spec(world, allow_ips=ips))
    created = await world.keyring.create_key(checked.spec)
    assert created["allowed_ips"] == checked.cidrs
    assert (await world.keyring.show_key(created["id"]))["allowed_ips"] == checked.cidrs
