"""deploy/nginx/gateway.conf, run in real nginx in front of an echo upstream."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from gateway._answer import denial
from gateway._services import free_port
from gateway.app import create_app
from gateway.audit import CLI
from gateway.config import Config, LimitConfig
from gateway.data.db import Database
from gateway.errors import InternalError
from gateway.grants import Grant, TokenService
from gateway.signing import SigningKeys
from tests._proxies import PATH_TRICKS, echo_app, fetch, seen, stop_process, wait_port
from tests.conftest import ROOT, Services, World
from tests.test_deploy_caddy import assert_no_secret, fake_key, raw_request, request_bytes

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


@dataclass
class Nginx:
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGQUIT)  # graceful: `daemon off`, so this is the master


def run_nginx(root: Path, gateway_port: int, upstream_port: int) -> Nginx:
    port = free_port()
    site = (ROOT / "deploy/nginx/gateway.conf").read_text()
    site = site.replace("127.0.0.1:8080", f"127.0.0.1:{gateway_port}")
    site = site.replace("127.0.0.1:9000", f"127.0.0.1:{upstream_port}")
    site = site.replace("listen 8000;", f"listen 127.0.0.1:{port};")
    site = site.replace("/var/log/nginx/gateway.access.log", str(root / "access.log"))
    root.mkdir(parents=True, exist_ok=True)
    (root / "site.conf").write_text(site)
    temp = "".join(f"{d}_temp_path {root}/{d};\n" for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (root / "nginx.conf").write_text(
        f"worker_processes 1;\ndaemon off;\npid {root}/nginx.pid;\nerror_log {root}/error.log warn;\n"
        f"events {{ worker_connections 256; }}\n"
        f"http {{\naccess_log off;\n{temp}include {root}/site.conf;\n}}\n"
    )
    check = subprocess.run(
        [NGINX, "-t", "-p", str(root), "-c", str(root / "nginx.conf"), "-e", str(root / "e.log")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stderr
    proc = subprocess.Popen([NGINX, "-p", str(root), "-c", str(root / "nginx.conf"), "-e", str(root / "e.log")])
    wait_port(port, proc, "nginx")
    return Nginx(port, proc)


@pytest.fixture
async def stack(aiohttp_server: Any, cfg: Config, tmp_path: Path) -> AsyncIterator[Nginx]:
    up = await aiohttp_server(echo_app())
    gw = await aiohttp_server(create_app(dataclasses.replace(cfg, policy_file=str(ROOT / "config/policy.yaml"))))
    nginx = await asyncio.to_thread(run_nginx, tmp_path / "nginx", gw.port, up.port)
    yield nginx
    await asyncio.to_thread(nginx.stop)


async def _get(nginx: Nginx, path: str = "/v1/things", headers: Any = None) -> tuple[int, Any, Any]:
    return await fetch(nginx.url, path, headers)


async def test_valid_key_reaches_upstream_with_gateway_identity(stack: Nginx, world: World) -> None:
    k = await world.key(orgs=[world.org_a])
    status, _, body = await _get(stack, headers={"Authorization": f"Bearer {k['key']}"})
    assert status == 200
    assert seen(body, "X-Org") == [world.org_a]
    assert seen(body, "X-Role") == ["admin"]
    assert seen(body, "X-User") == [world.user]
    assert seen(body, "X-Key-Id") == [k["id"]]
    assert seen(body, "X-Scopes") == ["*"]
    assert seen(body, "X-Auth-Method") == ["api_key"]
    assert seen(body, "Authorization") == []  # the key stops at nginx


async def test_client_identity_headers_never_reach_upstream(stack: Nginx, world: World) -> None:
    k = await world.key(role="viewer", orgs=[world.org_a])
    forged = [
        ("Authorization", f"Bearer {k['key']}"),
        ("X-Org", "org_evil"),
        ("x-role", "owner"),
        ("X-ROLE", "owner"),
        ("X-User", "usr_root"),
        ("X-Scopes", "*"),
        ("X-Scopes", "admin:*"),
        ("X_Org", "org_evil"),
        ("X_Role", "owner"),
        ("x-project", "prj_evil"),
        ("Connection", "keep-alive, X-Org, X-Role"),
    ]
    status, _, body = await _get(stack, headers=forged)
    assert status == 200
    assert seen(body, "X-Org") == [world.org_a]
    assert seen(body, "X-Role") == ["viewer"]
    assert seen(body, "X-User") == [world.user]
    assert seen(body, "X-Scopes") == ["*:read"]
    assert seen(body, "X-Project") == []  # empty from the gateway: nothing sent, the client's dropped
    for k_, _v in body["headers"]:
        assert k_.lower() not in ("x_org", "x_role")


async def test_denials_are_rebuilt_as_json(stack: Nginx, world: World) -> None:
    status, headers, body = await _get(stack)
    assert status == 401
    assert body["error"]["code"] == "missing_credentials"
    assert headers["X-Auth-Error"] == "missing_credentials"
    # Once: auth_request passes the gateway's own challenge on a 401, and nginx must not add a second.
    assert headers.getall("WWW-Authenticate") == ['Bearer error="missing_credentials"']
    assert headers["Content-Type"].startswith("application/json")

    status, headers, body = await _get(stack, headers={"X-API-Key": "gw_live_nope"})
    assert (status, body["error"]["code"]) == (401, "invalid_api_key")

    k = await world.key(orgs=[world.org_a])
    status, headers, body = await _get(stack, headers={"X-API-Key": k["key"], "X-Org-Id": world.org_b})
    assert (status, body["error"]["code"], headers["X-Auth-Error"]) == (403, "org_not_allowed", "org_not_allowed")
    assert "WWW-Authenticate" not in headers

    status, headers, body = await _get(stack, path=f"/v1/things?api_key={k['key']}", headers={"X-API-Key": k["key"]})
    assert (status, body["error"]["code"]) == (401, "invalid_request")
    assert headers.getall("WWW-Authenticate") == ['Bearer error="invalid_request"']  # nginx's own 401: its own


async def test_gateway_outage_is_503_not_401(stack: Nginx, world: World, services: Services) -> None:
    k = await world.key(orgs=[world.org_a])
    services.pg.stop()
    try:
        status, headers, body = await _get(stack, headers={"X-API-Key": k["key"]})
    finally:
        services.pg.start()
    assert (status, body["error"]["code"], headers["X-Auth-Error"]) == (503, "auth_unavailable", "auth_unavailable")


async def test_gateway_unreachable_is_503(cfg: Config, aiohttp_server: Any, tmp_path: Path) -> None:
    up = await aiohttp_server(echo_app())
    nginx = await asyncio.to_thread(run_nginx, tmp_path / "nginx", free_port(), up.port)
    try:
        status, headers, body = await _get(nginx, headers={"X-API-Key": "gw_live_x"})
    finally:
        await asyncio.to_thread(nginx.stop)
    assert (status, body["error"]["code"], headers["X-Auth-Error"]) == (503, "auth_unavailable", "auth_unavailable")


async def test_spoofed_forwarded_for_changes_nothing(stack: Nginx, world: World) -> None:
    only_doc = await world.key(name="doc", orgs=[world.org_a], allow_ips=["203.0.113.7/32"])
    local = await world.key(name="local", orgs=[world.org_a], allow_ips=["127.0.0.1/32"])
    spoof = {"X-Forwarded-For": "203.0.113.7"}
    status, _, body = await _get(stack, headers={"X-API-Key": only_doc["key"], **spoof})
    assert (status, body["error"]["code"]) == (403, "ip_not_allowed")
    status, _, body = await _get(stack, headers={"X-API-Key": local["key"], **spoof})
    assert status == 200
    assert seen(body, "X-Forwarded-For") == ["127.0.0.1"]


@pytest.mark.parametrize("trick", PATH_TRICKS)
async def test_path_tricks_do_not_reach_protected_routes(stack: Nginx, world: World, trick: str) -> None:
    status, headers, _ = await _get(stack, path=trick)
    assert status in (400, 401)  # nginx itself may refuse a path; it never reaches the upstream as public
    if status == 401:
        assert headers["X-Auth-Error"] == "invalid_request"


async def test_public_route_through_nginx(stack: Nginx, world: World) -> None:
    status, _, body = await _get(stack, path="/docs/intro", headers={"X-Org": "org_evil", "X-Auth-Method": "api_key"})
    assert status == 200
    assert seen(body, "X-Auth-Method") == ["anonymous"]
    assert seen(body, "X-Org") == []


async def test_rate_limit_rebuilt_with_retry_after(
    aiohttp_server: Any, cfg: Config, world: World, tmp_path: Path
) -> None:
    limits = dataclasses.replace(cfg.rate_limits, key=LimitConfig("1/1h", 1))
    gw = await aiohttp_server(create_app(dataclasses.replace(cfg, rate_limits=limits)))
    up = await aiohttp_server(echo_app())
    nginx = await asyncio.to_thread(run_nginx, tmp_path / "nginx", gw.port, up.port)
    try:
        k = await world.key(orgs=[world.org_a])
        status, headers, _ = await _get(nginx, headers={"X-API-Key": k["key"]})
        assert (status, headers["RateLimit-Limit"], headers["RateLimit-Remaining"]) == (200, "1", "0")
        status, headers, body = await _get(nginx, headers={"X-API-Key": k["key"]})
    finally:
        await asyncio.to_thread(nginx.stop)
    assert (status, body["error"]["code"], headers["X-Auth-Error"]) == (429, "rate_limited", "rate_limited")
    assert int(headers["Retry-After"]) > 0
    assert headers["RateLimit-Remaining"] == "0"


async def test_access_log_never_records_the_query(stack: Nginx, world: World, tmp_path: Path) -> None:
    """nginx's default log format keeps the request line, query included: a key sent there (and refused)
    stayed in the operator's access log. The shipped format logs the path alone."""
    k = await world.key(orgs=[world.org_a])
    for query in (f"api_key={k['key']}", f"x=1&token={k['key']}", f"q={k['key']}"):
        await _get(stack, path=f"/v1/things?{query}", headers={"X-API-Key": k["key"]})
    await _get(stack, path="/docs/intro?page=2")
    log = tmp_path / "nginx" / "access.log"
    for _ in range(50):
        if log.exists() and log.read_text().count("\n") >= 4:
            break
        await asyncio.sleep(0.02)
    text = log.read_text()
    assert '"GET /v1/things HTTP/1.1" 401' in text and '"GET /docs/intro HTTP/1.1" 200' in text
    assert k["key"] not in text and "?" not in text


def _log_text(log: Path, count: int) -> str:
    """The log once it has `count` lines (nginx writes a request's line after answering it)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not (log.exists() and log.read_text().count("\n") >= count):
        time.sleep(0.02)
    return log.read_text()


async def test_access_log_holds_no_key_from_basic_credentials_path_or_agent(stack: Nginx, tmp_path: Path) -> None:
    """The format logged $remote_user (a key sent as Basic credentials: `gw_live_...:x`) and the path as
    it came (a key in it, refused, still logged in full). Only `-` and the path cut after `_live_`/`_test_`."""
    keys = [fake_key("live" if i % 2 else "test") for i in range(7)]
    basic = base64.b64encode(f"{keys[0]}:x".encode()).decode()
    sent = [
        ("/v1/things", [("Authorization", f"Basic {basic}")], 401),
        (f"/v1/things/{keys[1]}/x", [], 401),  # a whole key: nginx refuses it itself
        (f"/v1/things/{keys[2].upper()}", [], 401),
        ("/v1/x%2F" + keys[3].replace("_", "%5F"), [], 401),  # encoded: $uri is decoded
        (f"/v1/things/{keys[4][:20]}", [], 401),  # a key's start only: the gateway refuses it
        ("/docs/intro", [("User-Agent", f"sdk/1.0 ({keys[5]})")], 200),
        ("/docs/intro", [("User-Agent", f"{keys[6].upper()}")], 200),
        ("/docs/intro", [], 200),
    ]
    for target, headers, status in sent:
        assert (await raw_request(stack.port, request_bytes(stack.port, target, headers)))[0] == status, target
    text = await asyncio.to_thread(_log_text, tmp_path / "nginx" / "access.log", len(sent))
    assert_no_secret(text.encode(), [*keys[:4], keys[4][:20], *keys[5:]])
    lines = text.splitlines()
    assert len(lines) == len(sent) and all(line.startswith("127.0.0.1 - - [") for line in lines), text
    assert [line.split('"')[1] for line in lines] == [
        "GET /v1/things HTTP/1.1",
        "GET /v1/things/gw_live_[redacted] HTTP/1.1",
        "GET /v1/things/GW_TEST_[redacted] HTTP/1.1",
        "GET /v1/x/gw_live_[redacted] HTTP/1.1",
        "GET /v1/things/gw_test_[redacted] HTTP/1.1",
        "GET /docs/intro HTTP/1.1",
        "GET /docs/intro HTTP/1.1",
        "GET /docs/intro HTTP/1.1",
    ]
    assert [line.split('"')[3] for line in lines[-3:]] == ["sdk/1.0 (gw_live_[redacted]", "GW_TEST_[redacted]", "-"]


async def test_error_log_holds_no_key_in_the_target_when_the_gateway_is_down(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    """nginx's error line for a gateway it cannot reach quotes the raw request line and the Host: a key in
    the query, the path or the Host went there in full. nginx now refuses those itself, asking no upstream."""
    up = await aiohttp_server(echo_app())
    nginx = await asyncio.to_thread(run_nginx, tmp_path / "nginx", free_port(), up.port)
    keys = [fake_key("live" if i % 2 else "test") for i in range(6)]
    port = nginx.port
    requests = [
        request_bytes(port, f"/v1/things?api_key={keys[0]}", []),
        request_bytes(port, f"/v1/things?x=1&anything={keys[1].replace('_', '%5f')}", []),
        request_bytes(port, f"/v1/things/{keys[2]}?page=2", []),
        request_bytes(port, "/docs/" + keys[3].replace("_", "%5F"), []),
        f"GET /v1/things HTTP/1.1\r\nHost: {keys[4]}\r\nConnection: close\r\n\r\n".encode(),
        # Headers never reach nginx's error log: this one is asked about, and the gateway is down.
        request_bytes(port, "/v1/things?page=2", [("X-Api-Key", keys[5]), ("Authorization", f"Bearer {keys[5]}")]),
    ]
    try:
        answers = [await raw_request(nginx.port, request) for request in requests]
    finally:
        await asyncio.to_thread(nginx.stop)
    text = (tmp_path / "nginx" / "error.log").read_text()
    assert_no_secret(text.encode(), keys)
    # The error log still says the gateway is down, for the one request nginx had to ask it about.
    assert text.count("connect() failed") == 1 and 'request: "GET /v1/things?page=2 HTTP/1.1"' in text, text
    assert [(status, headers.get("x-auth-error")) for status, headers, _ in answers] == [
        *[(401, "invalid_request")] * 5,
        (503, "auth_unavailable"),
    ]


async def test_a_gateway_bug_stays_a_500_with_its_request_id(aiohttp_server: Any, tmp_path: Path) -> None:
    """The shipped config answered anything but 401/403/429 as 503 auth_unavailable, a gateway bug
    included, and sent no request id. Now nginx sends its $request_id, and a 500 internal_error reaches
    the client as a 500 carrying the id the gateway logged. The auth server here answers exactly what the
    gateway answers on a bug (gateway.forward.denial of an InternalError, as tests/test_app.py checks)."""
    received: list[str] = []

    async def buggy_gateway(request: web.Request) -> web.StreamResponse:
        rid = request.headers.get("X-Request-Id", "")
        received.append(rid)
        return denial(InternalError(rid)).with_request_id(rid)

    gateway = web.Application()
    gateway.router.add_route("*", "/auth/nginx", buggy_gateway)
    auth = await aiohttp_server(gateway)
    up = await aiohttp_server(echo_app())
    nginx = await asyncio.to_thread(run_nginx, tmp_path / "nginx", auth.port, up.port)
    try:
        status, headers, body = await _get(nginx, headers={"X-API-Key": "gw_live_x"})
    finally:
        await asyncio.to_thread(nginx.stop)
    assert len(received) == 1 and len(received[0]) == 32  # nginx's $request_id
    assert (status, body["error"]["code"], headers["X-Auth-Error"]) == (500, "internal_error", "internal_error")
    assert headers["X-Request-Id"] == received[0] and received[0] in body["error"]["message"]


async def test_a_jwt_reaches_upstream_as_its_user_and_bad_ones_are_rebuilt(
    stack: Nginx, world: World, cfg: Config
) -> None:
    """Issue 12: a JWT access token through nginx: the upstream gets the token's identity (X-Auth-Method:
    jwt), never the token; an expired or bad token comes back as the gateway's 401 with its code."""
    signing = SigningKeys(Database(world.pool), cfg.tokens)
    await signing.load()  # the keys the gateway made at start-up
    grants = TokenService(Database(world.pool), signing, cfg.tokens, cfg.pepper.get().encode(), "gw")
    pair = await grants.issue(Grant(world.user, world.org_a, "member", ("*:read",), None, None), CLI)
    status, _, body = await _get(stack, headers={"Authorization": f"Bearer {pair['access_token']}"})
    assert status == 200
    assert (seen(body, "X-Org"), seen(body, "X-Role"), seen(body, "X-User")) == (
        [world.org_a],
        ["member"],
        [world.user],
    )
    assert (seen(body, "X-Auth-Method"), seen(body, "X-Scopes")) == (["jwt"], ["*:read"])
    assert seen(body, "Authorization") == []
    now = int(time.time())
    claims = {
        **{"iss": "gateway", "aud": "gateway", "sub": world.user, "org": world.org_a, "role": "member"},
        **{"scope": "*:read", "sid": "fam_x", "jti": "j", "iat": now - 900, "nbf": now - 900, "exp": now - 60},
    }
    tampered = pair["access_token"][:-4] + "AAAA"
    for token, code in ((signing.sign(claims), "expired_token"), (tampered, "invalid_token")):
        status, headers, body = await _get(stack, headers={"Authorization": f"Bearer {token}"})
        assert (status, body["error"]["code"], headers["WWW-Authenticate"]) == (401, code, f'Bearer error="{code}"')
