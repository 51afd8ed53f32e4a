"""Issue 9, item 1: the gateway authorises the raw target the proxy forwards, as the upstream will route it.

Each target below is sent as raw bytes through real nginx and real Caddy (the shipped configs), to a
real upstream framework (Starlette under uvicorn, tests/_upstream.py, routes mirroring the shipped policy),
anonymously and with a key for org A only (plus `X-Org-Id: A`). Either the gateway (or the proxy itself)
refuses it and the upstream receives nothing, or the upstream routes it to the route, org and project the
gateway decided on. Starlette's own routing is checked (`strict`), and the same routes matched
case-insensitively (`folded`, as Express and ASP.NET do). Other routers are modelled in tests/test_paths.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from gateway._services import free_port
from gateway.data.db import Database
from gateway.directory import Directory
from gateway.keyring import Keyring, KeySpec
from gateway.keys import KeyFormat, SecretHasher
from tests._proxies import stop_process, wait_port
from tests.conftest import ROOT, GatewayProcess, Services, make_config, spawn_gateway
from tests.test_deploy_caddy import Caddy, run_caddy
from tests.test_deploy_nginx import Nginx, run_nginx

SAME = "same"


@dataclass(frozen=True)
class Case:
    """A raw target (`{A}`, `{B}`: the two orgs' ids, `{a}`: A's id in swapped case, `{P}`: a project of A)
    and the gateway's decision: `refused` (not canonical), `deny` (no rule), or the route it authorises,
    with the org and project it takes from the path or, for `api`, from `X-Org-Id`. `strict` is the route
    Starlette itself picks when it differs (it routes case-sensitively: `None` is its 404). `caddy` is the
    decision behind Caddy when it differs: Go re-escapes what may not appear raw before both the gateway
    (`X-Forwarded-Uri`) and the upstream see it, so both judge the same escaped target."""

    target: str
    route: str
    org: str | None = None
    project: str | None = None
    strict: str | None = SAME
    caddy: str = SAME


CASES = [
    # Canonical targets: allowed as the routers route them.
    Case("/", "home"),
    Case("/docs/x", "docs"),
    Case("/docs", "docs"),
    Case("/docs/guide/", "docs"),
    Case("/docs/caf%C3%A9", "docs"),
    Case("/docs/%F0%9F%98%80", "docs"),
    Case("/docs/a%20b", "docs"),
    Case("/docs/x?page=2", "docs"),
    Case("/v1/orgs/{A}/things", "org", "A"),
    Case("/v1/orgs/{A}/things/", "org", "A"),
    Case("/v1/orgs/{A}", "org", "A"),
    Case("/v1/orgs/{A}/projects/{P}/calls", "project", "A", "P"),
    Case("/v1/orgs/{B}/things", "org", "B"),
    Case("/v1/orgs/{a}/things", "org", "a"),  # an id keeps its case: another org
    Case("/v1/things", "api", "A"),
    Case("/v1/things/urn%3Aisbn%3A1", "api", "A"),
    Case("/v1/things/a:b@c!$&'()*+,=", "api", "A"),
    Case("/.well-known/x", "deny"),
    # Upper-case literals: the policy ignores case, like Express; Starlette matches other routes, or none.
    Case("/v1/ORGS/{B}/things", "org", "B", strict="api"),
    Case("/V1/Orgs/{B}/things", "org", "B", strict=None),
    Case("/v1/Orgs/{A}/things", "org", "A", strict="api"),
    Case("/V1/ORGS/{A}/PROJECTS/{P}/x", "project", "A", "P", strict=None),
    Case("/DOCS/x", "docs", strict=None),
    Case("/Docs", "docs", strict=None),
    # Dot segments, raw and encoded (issue 9, item 1's reproductions first).
    Case("/v1/orgs/{B}/things/../../../../docs/x", "refused"),
    Case("/v1/orgs/{B}/../{A}/things", "refused"),
    Case("/docs/../v1/orgs/{B}/things", "refused"),
    Case("/docs/%2e%2e/v1/orgs/{B}/things", "refused"),
    Case("/docs/%2E./v1/orgs/{B}/things", "refused"),
    Case("/docs/.%2e/v1/orgs/{B}/things", "refused"),
    Case("/docs/./x", "refused"),
    Case("/v1/orgs/{A}/things/.", "refused"),
    Case("/v1/orgs/{A}/things/..", "refused"),
    # Fragments: Express stops at a raw #, nginx passes it on.
    Case("/v1/orgs/{B}/things#/../../../../docs/x", "refused"),
    Case("/v1/orgs/{B}/x#/../../{A}/things", "refused"),
    Case("/docs/#/../v1/orgs/{B}/things", "refused"),
    Case("/v1/things?x=1#frag", "refused"),
    # Path parameters (Tomcat, Spring), trailing dots and spaces (IIS).
    Case("/v1/orgs;x=1/{B}/things", "refused"),
    Case("/v1/orgs/{A}/..;/{B}/things", "refused"),
    Case("/docs/..;/v1/orgs/{B}/things", "refused"),
    Case("/v1/things;jsessionid=x", "refused"),
    Case("/v1/orgs/{B}%3Bx/things", "refused"),
    Case("/v1/orgs./{B}/things", "refused"),
    Case("/v1/orgs/{B}./things", "refused"),
    Case("/v1/orgs%20/{B}/things", "refused"),
    Case("/v1/orgs/{B} /things", "refused"),
    # Slashes: repeated, encoded, backslashes.
    Case("//v1/orgs/{B}/things", "refused"),
    Case("/v1//orgs/{B}/things", "refused"),
    Case("/docs%2f..%2fv1/orgs/{B}/things", "refused"),
    Case("/docs/..%2Fv1/orgs/{B}/things", "refused"),
    Case("/docs/..%5cv1/orgs/{B}/things", "refused"),
    Case("/docs\\..\\v1/orgs/{B}/things", "refused"),
    # Encoded plain characters: Express routes them raw, Starlette decoded.
    Case("/v1/%6Frgs/{B}/things", "refused"),
    Case("/%64ocs/x", "refused"),
    Case("/docs/%252e%252e/v1/orgs/{B}/things", "refused"),
    # NUL, controls, bad percent-encoding, bad or folding UTF-8.
    Case("/docs/x%00", "refused"),
    Case("/docs/a\tb", "refused"),
    Case("/docs/x%", "refused"),
    Case("/docs/%c0%af..%c0%afv1", "refused"),
    Case("/docs/%ff", "refused"),
    Case("/v1/%C4%B1tems", "refused"),
    Case("/docs/caf\u00e9", "refused", caddy="docs"),  # Caddy sends /docs/caf%C3%A9 on
]


@dataclass
class Stack:
    nginx: int
    caddy: int
    upstream: int
    ids: dict[str, str]
    key: str


def http(port: int, target: str, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    """The status and headers of one request whose target goes out byte for byte (no client cleaning)."""
    # Caddy serves the site named by its address only: the Host must be that address.
    lines = [f"GET {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", *(f"{k}: {v}" for k, v in headers.items())]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(("\r\n".join([*lines, "Connection: close", "", ""])).encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    fields = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return int(head[0].split(" ", 2)[1]), fields


def upstream_record(stack: Stack, test_id: str) -> dict[str, Any] | None:
    """What the upstream received under this id, asked directly: None if it received nothing."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{stack.upstream}/__seen/{test_id}", timeout=10) as r:
            record: dict[str, Any] = json.loads(r.read())
            return record
    except urllib.error.HTTPError as exc:
        assert exc.code == 404
        return None


async def _world(services: Services) -> tuple[dict[str, str], str]:
    """Orgs A and B, a user who is admin of A and viewer of B, a project of A, and a key for A only."""
    cfg = make_config(services)
    conn = await asyncpg.connect(services.pg.url)
    try:
        await conn.execute("TRUNCATE audit_events, api_keys, projects, memberships, users, orgs CASCADE")
    finally:
        await conn.close()
    rd = aioredis.Redis.from_url(services.redis.url)
    await rd.flushall()
    await rd.aclose()
    pool = await asyncpg.create_pool(services.pg.url, min_size=1, max_size=2)
    hasher = SecretHasher(cfg.keys.argon2, 1)
    try:
        db = Database(pool)
        directory, keyring = Directory(db, cfg.roles), Keyring(db, KeyFormat(cfg.keys.prefix), hasher, cfg.roles)
        a = (await directory.create_org("A"))["id"]
        b = (await directory.create_org("B"))["id"]
        user = (await directory.create_user("paths@example.com"))["id"]
        await directory.set_member(a, user, "admin")
        await directory.set_member(b, user, "viewer")
        p = (await directory.create_project(a, "web"))["id"]
        key = await keyring.create_key(
            KeySpec(user_id=user, name="a", role="admin", orgs=[a], projects=[], scopes=None)
        )
    finally:
        hasher.close()
        await pool.close()
    return {"A": a, "B": b, "a": a.swapcase(), "P": p}, key["key"]


def _uvicorn(port: int, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        cmd = [sys.executable, "-m", "uvicorn", "tests._upstream:app", "--host", "127.0.0.1", "--port", str(port)]
        return subprocess.Popen(
            [*cmd, "--http", "h11", "--log-level", "warning", "--no-access-log"], cwd=ROOT, stdout=out, stderr=out
        )


@pytest.fixture(scope="module")
def stack(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One upstream, one gateway (shipped policy, no rate limits: ~500 requests from one address), one
    nginx and one Caddy for the whole table."""
    tmp = tmp_path_factory.mktemp("paths")
    ids, key = asyncio.run(_world(services))
    up_port = free_port()
    up = _uvicorn(up_port, tmp / "upstream.log")
    gw: GatewayProcess | None = None
    started: list[Nginx | Caddy] = []
    try:
        wait_port(up_port, up, "uvicorn")
        gw = spawn_gateway(
            services,
            tmp,
            "gw",
            config_yaml=f"policy_file: {ROOT / 'config/policy.yaml'}\nrate_limits: {{enabled: false}}\n",
        )
        wait_port(gw.port, gw.proc, "gateway", timeout_s=30)
        started.append(run_nginx(tmp / "nginx", gw.port, up_port))
        started.append(run_caddy(tmp / "caddy", gw.port, up_port))
        yield Stack(started[0].port, started[1].port, up_port, ids, key)
    finally:
        for proxy in reversed(started):
            proxy.stop()
        if gw is not None:
            gw.stop()
        stop_process(up)


def _check_consistent(record: dict[str, Any], auth: str) -> None:
    """Whatever route the upstream took, under either matching, acts for the org and project the gateway
    authorised, and never anonymously on a protected route."""
    ident = record["identity"]
    for view in ("strict", "folded"):
        route, params = record[view]["route"], record[view]["params"]
        if route in ("org", "project", "api"):
            assert (ident["x-auth-method"], auth) == ("api_key", "key"), (view, record)
            assert ident["x-org"], (view, record)
        if route in ("org", "project"):
            assert params["org"] == ident["x-org"], (view, record)
        if route == "project":
            assert params["project"] == ident["x-project"], (view, record)


def _refusal(case: Case, auth: str) -> tuple[int, str] | None:
    """The gateway's answer when it refuses (status, X-Auth-Error), or None when it allows."""
    if case.route == "refused":
        return 401, "invalid_request"
    if case.route == "deny":
        return 403, "route_not_allowed"
    if case.route in ("home", "docs"):
        return None
    if auth == "anonymous":
        return 401, "missing_credentials"
    return None if case.org == "A" else (403, "org_not_allowed")


def _check_allowed(stack: Stack, case: Case, auth: str, record: dict[str, Any], where: object) -> None:
    """The upstream routed it where the gateway decided, for the org and project it decided."""
    strict = case.route if case.strict == SAME else case.strict
    ident, params = record["identity"], record["folded"]["params"]
    assert (record["folded"]["route"], record["strict"]["route"]) == (case.route, strict), where
    assert ident["x-auth-method"] == ("anonymous" if auth == "anonymous" else "api_key"), where
    if case.route in ("org", "project", "api"):
        assert ident["x-org"] == stack.ids["A"], where
    if case.route in ("org", "project"):
        assert params["org"] == stack.ids["A"], where
    if case.route == "project":
        assert params["project"] == ident["x-project"] == stack.ids["P"], where


@pytest.mark.parametrize("case", CASES, ids=[c.target for c in CASES])
@pytest.mark.parametrize("proxy", ["nginx", "caddy"])
def test_upstream_routes_what_the_gateway_decided(stack: Stack, proxy: str, case: Case) -> None:
    port = stack.nginx if proxy == "nginx" else stack.caddy
    if proxy == "caddy" and case.caddy != SAME:
        case = dataclasses.replace(case, route=case.caddy)
    target = case.target.format(**stack.ids)
    for auth in ("anonymous", "key"):
        test_id = uuid.uuid4().hex
        headers = {"X-Test-Id": test_id}
        if auth == "key":
            headers |= {"Authorization": f"Bearer {stack.key}", "X-Org-Id": stack.ids["A"]}
        status, answer = http(port, target, headers)
        record = upstream_record(stack, test_id)
        where = (proxy, auth, target, status, answer.get("x-auth-error"), record)
        if record is not None:
            _check_consistent(record, auth)
        refusal = _refusal(case, auth)
        if refusal is None:
            # Allowed: the upstream answers itself (404 where Starlette has no route for it).
            assert record is not None and status == (200 if record["strict"]["route"] else 404), where
            _check_allowed(stack, case, auth, record, where)
            if proxy == "nginx":
                assert record["raw_path"] == target.split("?", 1)[0], where  # nginx forwards the target raw
        elif status == 400 and case.route == "refused":
            assert record is None, where  # the proxy refused the request line itself
        else:
            assert (status, answer.get("x-auth-error"), record) == (*refusal, None), where


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 40
    assert sum(c.route == "refused" for c in CASES) >= 30


def test_http10_without_host_reaches_public_routes_through_nginx(stack: Stack) -> None:
    """An HTTP/1.0 request has no Host: nginx then sends its server_name (`_` in the shipped config) as
    the Host, which the gateway refused as invalid_request even on a public route (review of issue 9)."""
    for target, route in (("/docs/x", "docs"), (f"/v1/orgs/{stack.ids['B']}/things", None)):
        test_id = uuid.uuid4().hex
        with socket.create_connection(("127.0.0.1", stack.nginx), timeout=10) as s:
            s.sendall(f"GET {target} HTTP/1.0\r\nX-Test-Id: {test_id}\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        status = int(data.split(b" ", 2)[1])
        record = upstream_record(stack, test_id)
        if route is None:  # protected: still refused for want of a key
            assert (status, record) == (401, None), data[:300]
        else:
            assert status == 200 and record is not None, data[:300]
            assert record["strict"]["route"] == route and record["identity"]["x-auth-method"] == "anonymous"
