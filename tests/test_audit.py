from __future__ import annotations

import asyncio
import json
import time

import asyncpg

from gateway.audit import FailureAuditor, UsageAuditor
from gateway.keys import KeyFormat, new_secret
from gateway.metrics import Metrics
from gateway.store import Store
from gateway.typedefs import USAGE
from tests.conftest import Client, World, nginx_headers


async def _rows(pool: asyncpg.Pool, type_: str) -> list[asyncpg.Record]:
    return list(await pool.fetch("SELECT * FROM audit_events WHERE type = $1 ORDER BY id", type_))


async def test_management_writes_audit_events(world: World) -> None:
    pool = world.pool
    k = await world.key(orgs=[world.org_a])
    await world.keyring.rotate_key(k["id"], "1h")
    await world.keyring.revoke_key(k["id"])
    created = await _rows(pool, "api_key.created")
    assert [r["key_id"] for r in created] == [k["id"]]
    assert len(await _rows(pool, "api_key.rotated")) == 1
    assert [r["key_id"] for r in await _rows(pool, "api_key.revoked")] == [k["id"]]
    changed = await _rows(pool, "membership.changed")
    assert len(changed) == 2  # the world fixture's two memberships
    text = " ".join(str(dict(r)) for r in await pool.fetch("SELECT * FROM audit_events"))
    assert k["key"] not in text and k["key"].split("_")[3][:43] not in text


async def test_denials_are_audited_in_aggregate(client: Client, world: World) -> None:
    k = await world.key(orgs=[world.org_a])
    for _ in range(30):
        await client.get("/auth/nginx", headers=nginx_headers(k["key"], **{"X-Org-Id": world.org_b}))
    await client.get("/auth/nginx", headers=nginx_headers())
    rows: list[asyncpg.Record] = []
    for _ in range(50):
        rows = await _rows(world.pool, "auth.failed")
        if sum(r["count"] for r in rows) >= 31:
            break
        await asyncio.sleep(0.05)
    by_code: dict[str, int] = {}
    for r in rows:
        code = json.loads(r["detail"])["code"]
        by_code[code] = by_code.get(code, 0) + r["count"]
    assert by_code == {"org_not_allowed": 30, "missing_credentials": 1}
    assert len(rows) <= 4  # aggregated, not one row per request
    assert any(r["key_id"] == k["id"] for r in rows)


async def test_a_flood_is_capped_and_the_drop_counted(world: World) -> None:
    metrics = Metrics()
    auditor = FailureAuditor(Store(world.pool, 2), max_rows_per_flush=5, metrics=metrics)
    for i in range(2000):
        auditor.record("invalid_api_key", None, f"198.51.{i // 256}.{i % 256}", None, "nginx")
    await auditor.flush()
    rows = await world.pool.fetch("SELECT type, count FROM audit_events WHERE type LIKE 'auth.failed%'")
    written = [r for r in rows if r["type"] == "auth.failed"]
    dropped = [r for r in rows if r["type"] == "auth.failed.dropped"]
    assert len(written) == 5
    assert sum(r["count"] for r in rows) == 2000
    assert dropped and dropped[0]["count"] == 1995
    assert metrics.audit_dropped._value.get() == 1995


async def test_made_up_key_ids_are_audited_per_address(client: Client, world: World) -> None:
    """Random keys from one client wrote a row per key each interval (~42 rows a second): failures of ids
    that belong to no key are counted per (code, address); only real key ids are named."""
    k = await world.key(orgs=[world.org_a])
    fmt = KeyFormat("gw")
    parsed = fmt.parse(k["key"])
    assert parsed is not None
    for _ in range(3):  # wrong secrets for a real key: worth naming the key
        await client.get("/auth/nginx", headers=nginx_headers(fmt.build("live", parsed.key_id, new_secret())))
    for _ in range(40):  # made-up ids: 401s, then 429s once the address is over its failure budget
        await client.get("/auth/nginx", headers=nginx_headers(fmt.generate("live")[0]))
    rows: list[asyncpg.Record] = []
    for _ in range(50):
        rows = await _rows(world.pool, "auth.failed")
        if sum(r["count"] for r in rows) >= 43:
            break
        await asyncio.sleep(0.05)
    assert sum(r["count"] for r in rows) == 43
    assert {r["key_id"] for r in rows} == {k["id"], None}
    # One group per (code, key): the 40 made-up ids make at most two (401, then 429), however the
    # 0.1 s flush intervals happen to split them into rows.
    groups = {(json.loads(r["detail"])["code"], r["key_id"]) for r in rows}
    assert len(groups) <= 3 and len(rows) <= 3 * len(groups), groups


async def test_denials_of_a_known_key_show_in_the_org_it_acts_in(client: Client, world: World) -> None:
    """auth.failed rows carried no org, so an org's audit page never showed them. A denial is attributed
    to the org the request acts in when the key can act there, and to no org otherwise."""
    k = await world.key(name="gone", orgs=[world.org_a])
    admin = await world.key(name="admin", orgs=[world.org_a])
    assert (await client.get("/auth/nginx", headers=nginx_headers(k["key"]))).status == 200
    await world.keyring.revoke_key(k["id"])
    for _ in range(50):
        r = await client.get("/auth/nginx", headers=nginx_headers(k["key"], **{"X-Org-Id": world.org_a}))
        if r.status == 401:
            break
        await asyncio.sleep(0.02)
    await client.get("/auth/nginx", headers=nginx_headers(k["key"], **{"X-Org-Id": world.org_b}))  # not its org
    rows: list[asyncpg.Record] = []
    for _ in range(50):
        rows = [r for r in await _rows(world.pool, "auth.failed") if r["key_id"] == k["id"]]
        if len(rows) >= 2:
            break
        await asyncio.sleep(0.05)
    assert sorted((r["org_id"] or "", json.loads(r["detail"])["code"]) for r in rows) == [
        ("", "revoked_api_key"),
        (world.org_a, "revoked_api_key"),
    ]
    r = await client.get(
        f"/v1/orgs/{world.org_a}/audit?type=auth.failed", headers={"Authorization": f"Bearer {admin['key']}"}
    )
    items = (await r.json())["items"]
    assert [(e["key_id"], e["detail"]["code"]) for e in items] == [(k["id"], "revoked_api_key")]


async def test_key_use_is_aggregated_per_key_per_minute(client: Client, world: World) -> None:
    """Issue 12: api_key.used, one row per key and minute (count, last address, last route), written in
    the background once the minute is over; never a row per request."""
    k = await world.key(orgs=[world.org_a])
    for uri in ("/v1/a", "/v1/b", "/v1/c"):
        assert (await client.get("/auth/nginx", headers=nginx_headers(k["key"], uri=uri))).status == 200
    usage = client.app[USAGE]
    if time.time() % 60 < 55:  # well inside the minute: it is not over, nothing is written yet
        await usage.flush()
        assert await _rows(world.pool, "api_key.used") == []
    await usage.flush(final=True)
    rows = await _rows(world.pool, "api_key.used")  # one, or two if the minute turned meanwhile
    assert sum(r["count"] for r in rows) == 3 and len(rows) <= 2
    row = rows[-1]
    assert (row["key_id"], row["org_id"], str(row["ip"])) == (k["id"], world.org_a, "127.0.0.1")
    assert json.loads(row["detail"])["last_route"] == "GET /v1/c"
    assert row["at"].second == 0  # the minute's start


async def test_key_use_beyond_the_bound_is_counted_as_dropped(world: World) -> None:
    usage = UsageAuditor(Store(world.pool, 1.0), Metrics(), max_keys=1)
    usage.record("key_a", None, None, "GET", "/")
    usage.record("key_b", None, None, "GET", "/")
    usage.record("key_b", None, None, "GET", "/")
    await usage.flush(final=True)
    assert [r["count"] for r in await _rows(world.pool, "api_key.used")] == [1]
    assert [r["count"] for r in await _rows(world.pool, "api_key.used.dropped")] == [2]
