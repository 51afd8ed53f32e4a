from __future__ import annotations

import asyncio
import re
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from gateway.app import create_app
from tests._faultproxy import FaultProxy
from tests.conftest import Client, Services, World, corrupt, make_config, nginx_headers, poll, start_gateway


async def test_healthz_readyz_metrics(client: Client, world: World) -> None:
    assert (await client.get("/healthz")).status == 200
    r = await poll(lambda: client.get("/readyz"), lambda r: r.status == 200)
    body = await r.json()
    assert body == {"status": "ready", "checks": {"postgres": "ok", "redis": "ok", "invalidations": "ok"}}
    k = await world.key(orgs=[world.org_a])
    await client.get("/auth/nginx", headers=nginx_headers(k["key"]))
    text = await (await client.get("/metrics")).text()
    assert 'gateway_auth_decisions_total{code="ok",endpoint="nginx"} 1.0' in text
    assert "gateway_auth_seconds_bucket" in text
    assert k["key"] not in text


async def test_readyz_stays_ready_while_redis_is_down(client: Client, world: World, services: Services) -> None:
    """An outage shared by every replica must not take them all out of service: /readyz reports the
    store in its body and metrics, answers at once, and stays 200 while /auth/* answers from fallbacks."""
    k = await world.key(orgs=[world.org_a])
    services.redis.stop()
    try:
        # A request that needs Redis finds it down (the rate limiter falls back to its local copy).
        assert (await client.get("/auth/nginx", headers=nginx_headers(k["key"]))).status == 200
        r = await client.get("/readyz")
        assert r.status == 200
        body = await r.json()
        assert body["status"] == "ready" and body["checks"]["redis"] == "unavailable"
        assert body["checks"]["postgres"] == "ok"
        metrics = await (await client.get("/metrics")).text()
        assert 'gateway_backend_up{backend="redis"} 0.0' in metrics
    finally:
        services.redis.start()
    # Found healthy again by the background check, without traffic.
    for _ in range(60):
        if (await (await client.get("/readyz")).json())["checks"]["redis"] == "ok":
            break
        await asyncio.sleep(0.1)
    assert (await (await client.get("/readyz")).json())["checks"]["redis"] == "ok"


async def test_keys_verify_endpoint(client: Client, world: World) -> None:
    k = await world.key(orgs=[world.org_a], scopes=["calls:read"], expires_in="1d")
    r = await client.post("/v1/keys/verify", json={"key": k["key"]})
    body = await r.json()
    assert r.status == 200
    assert body["valid"] is True and body["code"] == "VALID"
    assert body["key_id"] == k["id"] and body["org"] == world.org_a and body["role"] == "admin"
    assert body["scopes"] == ["calls:read"] and body["env"] == "live" and body["expires_at"].endswith("Z")
    assert set(body) == {"valid", "code", "key_id", "org", "role", "scopes", "env", "expires_at", "ratelimit"}
    r = await client.post("/v1/keys/verify", json={"key": k["key"], "permission": "calls:write"})
    assert (await r.json())["code"] == "INSUFFICIENT_PERMISSIONS"
    r = await client.post("/v1/keys/verify", json={"key": k["key"], "org": world.org_b})
    assert (await r.json())["code"] == "ORG_NOT_ALLOWED"
    r = await client.post("/v1/keys/verify", json={"key": "junk"})
    body = await r.json()
    assert (body["valid"], body["code"], body["key_id"]) == (False, "INVALID_API_KEY", None)


@pytest.mark.parametrize(
    "body", [b"not json", b"[1]", b'{"key": 1}', b'{"key": "x", "extra": 1}', b"{}", b'{"key": "x", "org": "bad org!"}']
)
async def test_keys_verify_bad_input(client: Client, world: World, body: bytes) -> None:
    r = await client.post("/v1/keys/verify", data=body, headers={"Content-Type": "application/json"})
    assert r.status == 400
    assert (await r.json())["error"]["code"] == "invalid_request"


async def test_unknown_routes_and_oversized_bodies(client: Client, world: World) -> None:
    r = await client.get("/nope")
    assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
    r = await client.delete("/healthz")
    assert r.status == 405
    r = await client.post("/v1/keys/verify", data=b"x" * 200_000)
    assert r.status == 413 and (await r.json())["error"]["code"] == "invalid_request"


async def test_no_raw_key_ever_appears_in_logs(services: Services, clean: None, world: World, tmp_path: Path) -> None:
    gw = await start_gateway(services, tmp_path, "logs", config_yaml="log: {access: true}\n")
    try:
        k = await world.key(orgs=[world.org_a])
        secret = k["key"].split("_")[3][:43]
        bad = corrupt(k["key"])
        async with aiohttp.ClientSession() as s:
            for key in (k["key"], bad):
                for path in ("/auth/nginx", f"/auth/nginx?api_key={key}", "/auth/verify"):
                    async with s.get(gw.url + path, headers=nginx_headers(key, uri=f"/x?token={key}")):
                        pass
                    async with s.get(gw.url + path, headers=nginx_headers(key)):
                        pass
                async with s.post(gw.url + "/v1/keys/verify", json={"key": key}):
                    pass
                async with s.get(gw.url + "/auth/nginx", headers={"X-API-Key": key}):
                    pass
            await world.keyring.revoke_key(k["id"])
            await asyncio.sleep(0.3)
            async with s.get(gw.url + "/auth/nginx", headers=nginx_headers(k["key"])) as r:
                assert r.status == 401
    finally:
        gw.stop()
    logs = gw.logs()
    assert "/auth/nginx" in logs  # the access log was captured
    for needle in (k["key"], bad, secret):
        assert needle not in logs


async def test_last_used_is_recorded(client: Client, world: World) -> None:
    k = await world.key(orgs=[world.org_a])
    assert (await world.keyring.show_key(k["id"]))["last_used_at"] is None
    assert (await client.get("/auth/nginx", headers=nginx_headers(k["key"]))).status == 200
    for _ in range(50):
        if (await world.keyring.show_key(k["id"]))["last_used_at"] is not None:
            break
        await asyncio.sleep(0.05)
    assert (await world.keyring.show_key(k["id"]))["last_used_at"] is not None


async def test_serve_with_several_workers(services: Services, clean: None, world: World, tmp_path: Path) -> None:
    gw = await start_gateway(services, tmp_path, "workers", "--workers", "2")
    worker_pids = _children(gw.proc.pid)
    assert len(worker_pids) >= 2  # two workers (and multiprocessing's resource tracker)
    try:
        for _ in range(100):  # both workers up
            if gw.logs().count("gateway serving on") == 2:
                break
            await asyncio.sleep(0.05)
        k = await world.key(orgs=[world.org_a])
        async with aiohttp.ClientSession() as s:
            for _ in range(10):
                async with s.get(gw.url + "/auth/nginx", headers=nginx_headers(k["key"])) as r:
                    assert r.status == 200
    finally:
        gw.stop()
    assert gw.logs().count("gateway serving on") == 2
    assert gw.proc.returncode == 0
    for _ in range(100):  # no orphan is left behind (multiprocessing's tracker exits just after)
        if not any(_alive(pid) for pid in worker_pids):
            break
        await asyncio.sleep(0.05)
    assert not any(_alive(pid) for pid in worker_pids)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout
    return [int(p) for p in out.split()]


def _alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


async def test_redis_connections_are_capped(
    aiohttp_client: Any, services: Services, world: World, rclient: aioredis.Redis
) -> None:
    """Before, the pool grew with peak concurrency and kept every connection (1 -> 18 after 200
    concurrent clients); now `redis.max_connections` caps it, and requests wait briefly for a turn."""
    cfg = make_config(services, redis={"max_connections": 3}, rate_limits={"pipeline": False})
    c = await aiohttp_client(create_app(cfg))
    keys = [(await world.key(name=f"k{i}", orgs=[world.org_a]))["key"] for i in range(10)]
    statuses = await asyncio.gather(
        *(c.get("/auth/nginx", headers=nginx_headers(keys[i % len(keys)])) for i in range(200))
    )
    assert {r.status for r in statuses} == {200}
    ours = [cl for cl in await rclient.client_list() if cl.get("name") == "gateway"]
    assert 1 <= len(ours) <= 3, f"{len(ours)} connections from the gateway"


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/keys"), ("POST", "/v1/keys/verify"), ("POST", "/ui/session"), ("POST", "/v1/orgs")],
)
async def test_deeply_nested_json_is_a_bad_request(client: Client, world: World, method: str, path: str) -> None:
    """30,000 levels of nesting made the parser raise RecursionError, answered as a 503 with a traceback."""
    k = await world.key()  # every org: it may create orgs too
    for body in (b"[" * 30_000 + b"]" * 30_000, b'{"a":' * 10_000 + b"1" + b"}" * 10_000):
        r = await client.post(
            path, data=body, headers={"Content-Type": "application/json", "Authorization": f"Bearer {k['key']}"}
        )
        assert (r.status, (await r.json())["error"]["code"]) == (400, "invalid_request"), path


async def test_a_deeply_nested_cursor_is_a_bad_request(client: Client, world: World) -> None:
    import base64

    k = await world.key(orgs=[world.org_a])
    cursor = base64.urlsafe_b64encode(b"[" * 5000).decode().rstrip("=")
    r = await client.get(f"/v1/keys?cursor={cursor}", headers={"Authorization": f"Bearer {k['key']}"})
    assert (r.status, (await r.json())["error"]["code"]) == (400, "invalid_request")


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    from gateway._body import json_object

    assert json_object(b'{"name": "' + b"[" * 100 + b'"}') == {"name": "[" * 100}


async def test_keys_verify_charges_failures_to_the_caller(client: Client, world: World) -> None:
    """Before, /v1/keys/verify passed no address: 15 junk keys from anyone made every caller's real keys
    answer RATE_LIMITED. Now one caller's failures only count against that caller's address."""
    from gateway.keys import KeyFormat

    fmt = KeyFormat("gw")
    junk = {"X-Forwarded-For": "198.51.100.7"}
    for _ in range(15):
        r = await client.post("/v1/keys/verify", json={"key": fmt.generate("live")[0]}, headers=junk)
        assert (await r.json())["valid"] is False
    fresh = await world.key(orgs=[world.org_a])  # uncached: its lookup is the guarded, costly path
    r = await client.post("/v1/keys/verify", json={"key": fresh["key"]}, headers={"X-Forwarded-For": "198.51.100.8"})
    body = await r.json()
    assert (body["valid"], body["code"]) == (True, "VALID")
    r = await client.post("/v1/keys/verify", json={"key": fmt.generate("live")[0]}, headers=junk)
    assert (await r.json())["code"] == "RATE_LIMITED"  # the junk sender itself is slowed down


async def test_access_log_is_off_by_default_and_denials_are_logged(
    services: Services, clean: None, world: World, tmp_path: Path
) -> None:
    """A line per request costs a good share of a cached decision and the proxy logs every request
    already: off unless `log.access: true`. Each denial still gets one line, with its code."""
    gw = await start_gateway(services, tmp_path, "quiet")
    try:
        k = await world.key(orgs=[world.org_a])
        async with aiohttp.ClientSession() as s:
            for _ in range(3):
                async with s.get(gw.url + "/auth/nginx", headers=nginx_headers(k["key"])) as r:
                    assert r.status == 200
            async with s.get(gw.url + "/auth/nginx", headers=nginx_headers("gw_live_nope")) as r:
                assert r.status == 401
        await asyncio.sleep(0.2)
    finally:
        gw.stop()
    logs = gw.logs()
    assert "aiohttp.access" not in logs and '"GET /auth/nginx"' not in logs, logs[-2000:]
    line = (
        "decision outcome=deny code=invalid_api_key endpoint=nginx auth=api_key key_id=- org=- route='GET /v1/things'"
    )
    assert f"{line} client=127.0.0.1 latency_ms=" in logs, logs[-2000:]


@pytest.mark.parametrize("sent", [None, "req-42.a:b", "not a plain id\u00e9"])
async def test_a_bug_is_500_internal_error_with_its_request_id(
    aiohttp_client: Any, services: Services, caplog: pytest.LogCaptureFixture, sent: str | None
) -> None:
    """Issue 11: the catch-all answered a bug 503 auth_unavailable, an outage a client retries and an
    operator looks for in Postgres and Redis. Now 500 internal_error, logged with its traceback under the
    request id it answers with (the proxy's plain X-Request-Id, else a new one). The bug: a handler of
    this test's own that raises, behind the app's real middleware."""

    async def broken(_request: web.Request) -> web.Response:
        raise ValueError("a bug")

    app = create_app(make_config(services))
    app.router.add_get("/broken", broken)
    c = await aiohttp_client(app)
    r = await c.get("/broken", headers={"X-Request-Id": sent} if sent else {})
    body = await r.json()
    assert (r.status, r.headers["X-Auth-Error"], body["error"]["code"]) == (500, "internal_error", "internal_error")
    rid = r.headers["X-Request-Id"]
    if sent == "req-42.a:b":
        assert rid == sent
    else:
        assert re.fullmatch("[0-9a-f]{13,}", rid) and rid != sent
    assert rid in body["error"]["message"] and "a bug" not in body["error"]["message"]
    logged = [rec for rec in caplog.records if rid in rec.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None and logged[0].exc_info[0] is ValueError


async def test_a_store_outage_that_escaped_its_mapping_is_still_503(
    aiohttp_client: Any, services: Services, clean: None, world: World
) -> None:
    """A management call whose Postgres connection is refused answers 503 auth_unavailable, not 500:
    only a bug is internal_error."""
    with FaultProxy(services.pg.port) as proxy:
        url = f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres"
        c = await aiohttp_client(create_app(make_config(services, database={"url": url, "timeout_ms": 300})))
        k = await world.key(orgs=[world.org_a])
        headers = {"Authorization": f"Bearer {k['key']}"}
        assert (await c.get(f"/v1/orgs/{world.org_a}/members", headers=headers)).status == 200
        proxy.refuse()
        for path in (f"/v1/orgs/{world.org_a}/members", "/v1/keys", f"/v1/orgs/{world.org_a}/audit"):
            r = await c.get(path, headers=headers)
            assert (r.status, r.headers["X-Auth-Error"]) == (503, "auth_unavailable"), path
