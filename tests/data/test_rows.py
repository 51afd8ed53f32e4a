"""The data layer's rows are what their types say: every row dataclass, read from a real database in the
states that matter (limits, a service account, a stop, a rotation, an invitation, denials), holds values of
its annotated types, field by field. A query that drifted from its dataclass fails here (asyncpg would
hand over an IPv4Network for a cidr, a naive datetime, a JSON string for jsonb...)."""

from __future__ import annotations

import dataclasses
import types
from datetime import UTC, datetime, timedelta
from typing import Any, Union, get_args, get_origin, get_type_hints

import pytest

from gateway.audit import CLI, Actor
from gateway.data import audit, invitations, keys, orgs, users
from gateway.data.audit import FailureRow
from gateway.data.db import typed
from gateway.invitations import Invitations
from tests.conftest import World


def conforms(value: Any, tp: Any) -> bool:
    origin = get_origin(tp)
    if tp is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(conforms(value, arg) for arg in get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(conforms(v, get_args(tp)[0]) for v in value)
    if origin is dict:
        kt, vt = get_args(tp)
        return isinstance(value, dict) and all(conforms(k, kt) and conforms(v, vt) for k, v in value.items())
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is datetime:
        return isinstance(value, datetime) and value.tzinfo is not None
    return isinstance(value, tp)


def assert_typed(row: Any) -> None:
    hints = get_type_hints(type(row))
    for f in dataclasses.fields(row):
        value = getattr(row, f.name)
        assert conforms(value, hints[f.name]), f"{type(row).__name__}.{f.name} = {value!r} is not {hints[f.name]}"


@pytest.mark.parametrize(
    ("value", "tp", "expected"),
    [
        ("10.0.0.0/8", list[str] | None, False),
        (["10.0.0.0/8"], list[str] | None, True),
        (None, list[str] | None, True),
        (datetime(2026, 1, 1), datetime, False),  # naive: not what timestamptz gives
        (datetime(2026, 1, 1, tzinfo=UTC), datetime | None, True),
        ('{"a": 1}', dict[str, Any], False),
        (True, int, False),
    ],
)
def test_the_checker_tells_types_apart(value: Any, tp: Any, expected: bool) -> None:
    assert conforms(value, tp) is expected


async def test_key_rows(world: World) -> None:
    project = await world.directory.create_project(world.org_a, "p")
    limited = await world.key(
        name="limited",
        orgs=[world.org_a],
        projects=[project["id"]],
        scopes=["calls:read"],
        allow_ips=["10.1.2.3", "10.0.0.0/8"],
        rate_limit="5/1m",
        expires_in="1d",
        env="test",
    )
    open_key = await world.key(name="open")
    await world.keyring.stop_key_in(open_key["id"], [world.org_b], Actor(world.user))
    await world.keyring.rotate_key(open_key["id"], "1h")
    async with world.keyring.db.connect() as conn:
        row = await keys.get(conn, limited["id"])
        assert row is not None and row.allowed_cidrs == ["10.1.2.3/32", "10.0.0.0/8"]
        rotated = await keys.get(conn, open_key["id"], lock=True)
        assert rotated is not None and rotated.rotated_to is not None and rotated.expires_at is not None
        listed = await keys.listing(
            conn, owner=world.user, org=None, status=None, now=datetime.now(UTC), after=None, limit=None
        )
        assert len(listed) == 3
        reach = await keys.reach(conn, open_key["id"])
        assert reach is not None and reach.orgs == sorted([world.org_a, world.org_b])
        stops = await keys.blocks(conn, [open_key["id"], rotated.rotated_to])
        assert {(b.key_id, b.org_id) for b in stops} == {
            (open_key["id"], world.org_b),
            (rotated.rotated_to, world.org_b),  # a rotation keeps the stop
        }
        naming = await keys.naming_project(conn, project["id"], world.org_a)
        assert [(n.id, n.owner_role) for n in naming] == [(limited["id"], "admin")]
        revoked = await keys.revoke(conn, limited["id"])
        again = await keys.revoke(conn, limited["id"])
        assert revoked is not None and again is not None and again.revoked_at == revoked.revoked_at
        loaded = await keys.load(conn, limited["id"])
        assert loaded is not None and loaded[1].startswith("$argon2id$")
        assert await keys.get(conn, "no_such_key") is None
    for r in [row, rotated, *listed, reach, *stops, *naming, revoked]:
        assert_typed(r)


async def test_directory_rows(world: World) -> None:
    await world.directory.create_project(world.org_a, "p")
    sa = await world.directory.create_service_account(world.org_a, "robot", "viewer", CLI)
    async with world.keyring.db.connect() as conn:
        found = [
            *await orgs.orgs(conn, [world.org_a, world.org_b]),
            *await orgs.memberships(conn, [world.user, sa["id"]]),
            *await orgs.members(conn, world.org_a),
            *await orgs.projects(conn, world.org_a),
            *await users.service_accounts(conn, world.org_a),
        ]
        assert await users.service_org(conn, sa["id"]) == world.org_a
        assert await users.service_org(conn, world.user) is None
        assert await orgs.role(conn, world.org_b, world.user) == "viewer"
    kinds = {type(r).__name__ for r in found}
    assert kinds == {"OrgRow", "Membership", "MemberRow", "ProjectRow", "ServiceAccountRow"}
    members = [r for r in found if isinstance(r, orgs.MemberRow)]
    assert {(m.kind, m.email, m.name) for m in members} == {
        ("human", "owner@example.com", None),
        ("service", None, "robot"),
    }
    for r in found:
        assert_typed(r)


async def test_invitation_rows(world: World) -> None:
    invite = Invitations(world.directory)
    made = await invite.invite(world.org_a, "new@example.com", "viewer", Actor(world.user))
    async with world.keyring.db.connect() as conn:
        row = await invitations.get(conn, made["id"])
        pending = await invitations.pending(conn, datetime.now(UTC), org_id=world.org_a)
        assert await invitations.get(conn, made["id"], org_id=world.org_b) is None  # another org's
    assert row is not None and [p.id for p in pending] == [row.id]
    assert row.status(row.expires_at - timedelta(seconds=1)) == "pending"
    assert row.status(row.expires_at) == "expired"  # lapsed, though still stored as pending
    for r in [row, *pending]:
        assert_typed(r)


async def test_audit_rows(world: World) -> None:
    await world.key(name="k")
    now = datetime.now(UTC)
    async with world.keyring.db.connect() as conn:
        await audit.insert_failures(
            conn, [FailureRow(now, "auth.failed", world.org_a, None, "10.0.0.1", 3, {"code": "invalid_key"})]
        )
        events = await audit.events(
            conn, world.org_a, type_=None, key_id=None, actor=None, since=None, until=None, before_id=None, limit=50
        )
    assert {e.type for e in events} >= {"auth.failed", "api_key.created", "org.created", "membership.changed"}
    failed = next(e for e in events if e.type == "auth.failed")
    assert (failed.ip, failed.count, failed.detail) == ("10.0.0.1", 3, {"code": "invalid_key"})
    for e in events:
        assert_typed(e)


async def test_a_row_is_its_dataclass_or_none(world: World) -> None:
    async with world.keyring.db.connect() as conn:
        assert typed(orgs.OrgRow, await conn.fetchrow("SELECT id, name FROM orgs WHERE id = $1", "nope")) is None
        with pytest.raises(TypeError):  # a query and its dataclass that disagree fail loudly, not quietly
            typed(orgs.OrgRow, await conn.fetchrow("SELECT id FROM orgs WHERE id = $1", world.org_a))
