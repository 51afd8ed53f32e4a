"""deploy/caddy/Caddyfile, run in real Caddy in front of an echo upstream."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway._services import free_port
from gateway.app import create_app
from tests._proxies import PATH_TRICKS, echo_app, fetch, seen, stop_process, wait_port
from tests.conftest import ROOT, Services, World, make_config

CADDY = shutil.which("caddy") or "/usr/bin/caddy"

# A key's secret part in a log is `_live_`/`_test_` followed by anything but the redaction mark.
UNREDACTED = re.compile(rb"_(?:live|test)_(?!\[redacted\])", re.IGNORECASE)


def fake_key(env: str = "live") -> str:
    """Shaped like one of ours (`gw_<env>_<16 id>_<49 secret+checksum>`); its every tail is unique."""
    return f"gw_{env}_{secrets.token_hex(8)}_{secrets.token_hex(25)[:49]}"


def assert_no_secret(log: bytes, keys: list[str]) -> None:
    """No key's secret part (after its last `_`), in any case, and nothing after `_live_`/`_test_` unredacted."""
    for key in keys:
        assert key.rsplit("_", 1)[1].lower().encode() not in log.lower(), (key, log)
    assert UNREDACTED.search(log) is None, log


async def raw_request(port: int, request: bytes, timeout_s: float = 30) -> tuple[int, dict[str, str], bytes]:
    """Send `request` byte for byte (it should say `Connection: close`); the status, headers and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout_s)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return int(lines[0].split(" ", 2)[1]), fields, body


def request_bytes(port: int, target: str, headers: list[tuple[str, str]], method: str = "GET") -> bytes:
    """Caddy serves the site named by its address only: the Host is that address."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", *(f"{k}: {v}" for k, v in headers)]
    return "\r\n".join([*lines, "Connection: close", "", ""]).encode()


@dataclass
class Caddy:
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_process(self.proc)


def run_caddy(root: Path, gateway_port: int, upstream_port: int) -> Caddy:
    port = free_port()
    conf = (ROOT / "deploy/caddy/Caddyfile").read_text()
    conf = conf.replace("127.0.0.1:8080", f"127.0.0.1:{gateway_port}").replace(
        "127.0.0.1:9000", f"127.0.0.1:{upstream_port}"
    )
    conf = conf.replace("http://:8000 {", f"http://127.0.0.1:{port} {{")
    root.mkdir(parents=True, exist_ok=True)
    (root / "Caddyfile").write_text(conf)
    env = {**os.environ, "HOME": str(root), "XDG_DATA_HOME": str(root / "data"), "XDG_CONFIG_HOME": str(root / "cfg")}
    with open(root / "caddy.log", "wb") as log:
        proc = subprocess.Popen(
            [CADDY, "run", "--adapter", "caddyfile", "--config", str(root / "Caddyfile")],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    wait_port(port, proc, "caddy")
    return Caddy(port, proc)


@pytest.fixture
async def caddy(aiohttp_server: Any, services: Services, clean: None, tmp_path: Path) -> AsyncIterator[Caddy]:
    up = await aiohttp_server(echo_app())
    gw = await aiohttp_server(create_app(make_config(services, policy_file=str(ROOT / "config/policy.yaml"))))
    c = await asyncio.to_thread(run_caddy, tmp_path / "caddy", gw.port, up.port)
    yield c
    await asyncio.to_thread(c.stop)


async def test_valid_key_reaches_upstream_with_gateway_identity(caddy: Caddy, world: World) -> None:
    k = await world.key(orgs=[world.org_a])
    status, _, body = await fetch(caddy.url, headers={"Authorization": f"Bearer {k['key']}"})
    assert status == 200, body
    assert seen(body, "X-Org") == [world.org_a]
    assert seen(body, "X-Role") == ["admin"]
    assert seen(body, "X-Key-Id") == [k["id"]]
    assert seen(body, "X-Auth-Method") == ["api_key"]
    assert seen(body, "Authorization") == []


async def test_client_identity_headers_never_reach_upstream(caddy: Caddy, world: World) -> None:
    k = await world.key(role="viewer", orgs=[world.org_a])
    forged = [
        ("Authorization", f"Bearer {k['key']}"),
        ("X-Org", "org_evil"),
        ("x-role", "owner"),
        ("X-ROLE", "owner"),
        ("X-Scopes", "*"),
        ("X-Scopes", "admin:*"),
        ("X-User", "usr_root"),
    ]
    status, _, body = await fetch(caddy.url, headers=forged)
    assert status == 200
    assert seen(body, "X-Org") == [world.org_a]
    assert seen(body, "X-Role") == ["viewer"]
    assert seen(body, "X-Scopes") == ["*:read"]
    assert seen(body, "X-User") == [world.user]
    # Named in Connection, Caddy would drop the gateway's own headers on the way to the upstream (issue 9,
    # item 6: the upstream received none of the six): refused as the gateway refuses it.
    named = "X-Org, X-Role, X-Scopes, X-Auth-Method, X-User, X-Key-Id"
    for value in (named, "X-Org", "keep-alive, x-role", "X-API-KEY"):
        status, headers, body = await fetch(caddy.url, headers=[*forged[:2], ("Connection", value)])
        assert (status, headers["X-Auth-Error"], body["error"]["code"]) == (401, "invalid_request", "invalid_request")
        assert headers["WWW-Authenticate"].startswith("Bearer")
    status, _, body = await fetch(caddy.url, headers=[forged[0], ("Connection", "keep-alive")])
    assert status == 200 and seen(body, "X-Org") == [world.org_a] and seen(body, "X-Role") == ["viewer"]
    # Underscore aliases pass through Caddy, so the gateway refuses them outright.
    status, headers, body = await fetch(caddy.url, headers=[forged[0], ("X_Org", "org_evil")])
    assert (status, headers["X-Auth-Error"]) == (401, "invalid_request")


async def test_denials_come_back_as_the_gateways_json(caddy: Caddy, world: World) -> None:
    status, headers, body = await fetch(caddy.url)
    assert (status, body["error"]["code"], headers["X-Auth-Error"]) == (
        401,
        "missing_credentials",
        "missing_credentials",
    )
    assert headers["WWW-Authenticate"].startswith("Bearer")
    status, _, body = await fetch(caddy.url, path="/admin")
    assert (status, body["error"]["code"]) == (403, "route_not_allowed")
    status, _, body = await fetch(caddy.url, path="/docs/intro")
    assert status == 200 and seen(body, "X-Auth-Method") == ["anonymous"]


@pytest.mark.parametrize("trick", PATH_TRICKS)
async def test_path_tricks_do_not_reach_protected_routes(caddy: Caddy, world: World, trick: str) -> None:
    status, headers, _ = await fetch(caddy.url, path=trick)
    assert (status, headers["X-Auth-Error"]) == (401, "invalid_request")


async def test_spoofed_forwarded_for_changes_nothing(caddy: Caddy, world: World) -> None:
    doc = await world.key(name="doc", orgs=[world.org_a], allow_ips=["203.0.113.7/32"])
    local = await world.key(name="local", orgs=[world.org_a], allow_ips=["127.0.0.1/32"])
    spoof = {"X-Forwarded-For": "203.0.113.7"}
    status, headers, _ = await fetch(caddy.url, headers={"X-API-Key": doc["key"], **spoof})
    assert (status, headers["X-Auth-Error"]) == (403, "ip_not_allowed")
    status, _, body = await fetch(caddy.url, headers={"X-API-Key": local["key"], **spoof})
    assert status == 200
    assert seen(body, "X-Forwarded-For") == ["127.0.0.1"]


UNAVAILABLE = {"error": {"code": "auth_unavailable", "message": "authentication service unavailable"}}


def assert_auth_unavailable(status: int, headers: dict[str, str], body: bytes) -> None:
    assert (status, headers.get("x-auth-error"), json.loads(body)) == (503, "auth_unavailable", UNAVAILABLE)
    assert headers["content-type"].startswith("application/json")
    assert headers["cache-control"] == "no-store"


async def test_gateway_unreachable_is_503_auth_unavailable(aiohttp_server: Any, tmp_path: Path) -> None:
    """Caddy answered its own empty 502 when forward_auth could not reach the gateway."""
    up = await aiohttp_server(echo_app())
    c = await asyncio.to_thread(run_caddy, tmp_path / "caddy", free_port(), up.port)
    try:
        request = request_bytes(c.port, "/v1/things", [("X-Api-Key", fake_key())])
        assert_auth_unavailable(*await raw_request(c.port, request))
        public = request_bytes(c.port, "/docs/intro", [])
        assert_auth_unavailable(*await raw_request(c.port, public))
    finally:
        await asyncio.to_thread(c.stop)


async def test_gateway_that_never_answers_is_503_auth_unavailable(aiohttp_server: Any, tmp_path: Path) -> None:
    """A gateway that accepts and never answers held the request for ever; now 503 after 5 s, as nginx."""

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until Caddy gives up and closes
        writer.close()

    hung = await asyncio.start_server(hold, "127.0.0.1", 0)
    up = await aiohttp_server(echo_app())
    c = await asyncio.to_thread(run_caddy, tmp_path / "caddy", hung.sockets[0].getsockname()[1], up.port)
    try:
        started = time.monotonic()
        answer = await raw_request(c.port, request_bytes(c.port, "/v1/things", [("X-Api-Key", fake_key())]), 20)
        assert_auth_unavailable(*answer)
        assert time.monotonic() - started < 10
    finally:
        await asyncio.to_thread(c.stop)
        hung.close()
        await hung.wait_closed()


async def test_upstream_unreachable_is_not_blamed_on_the_gateway(
    aiohttp_server: Any, services: Services, clean: None, world: World, tmp_path: Path
) -> None:
    """Only the gateway's failure is auth_unavailable: the upstream's own stays Caddy's 502. Its error line
    quoted the request's X-Api-Key, a key the gateway had just accepted (request_header strips it from the
    request to the upstream, not from the log)."""
    gw = await aiohttp_server(create_app(make_config(services, policy_file=str(ROOT / "config/policy.yaml"))))
    c = await asyncio.to_thread(run_caddy, tmp_path / "caddy", gw.port, free_port())
    try:
        k = await world.key(orgs=[world.org_a])
        status, headers, body = await raw_request(
            c.port, request_bytes(c.port, "/v1/things", [("X-Api-Key", k["key"])])
        )
        assert (status, "x-auth-error" in headers, body) == (502, False, b"")
        status, headers, _ = await raw_request(c.port, request_bytes(c.port, "/v1/things", []))
        assert (status, headers["x-auth-error"]) == (401, "missing_credentials")  # the gateway still decides
    finally:
        await asyncio.to_thread(c.stop)
    log = (tmp_path / "caddy" / "caddy.log").read_bytes()
    assert_no_secret(log, [k["key"]])
    assert log.count(b"connection refused") == 1, log


async def test_logs_hold_no_key_when_the_gateway_is_down(aiohttp_server: Any, tmp_path: Path) -> None:
    """With no gateway to refuse them, keys in the headers, the path, the query and the method reached
    Caddy's error log as sent (X-Api-Key and the query in full). Every error is still logged, filtered."""
    up = await aiohttp_server(echo_app())
    c = await asyncio.to_thread(run_caddy, tmp_path / "caddy", free_port(), up.port)
    keys = [fake_key("live" if i % 2 else "test") for i in range(10)]
    requests = [
        request_bytes(
            c.port,
            f"/v1/things?api_key={keys[0]}&token={keys[1]}&q=1",
            [
                ("X-Api-Key", keys[2]),
                ("Authorization", f"Bearer {keys[3]}"),
                ("Cookie", f"session={keys[4]}"),
                ("x-api-key", keys[5]),
                ("X-Any-Name", keys[6]),
            ],
        ),
        request_bytes(c.port, f"/v1/things/{keys[7]}/x", []),
        request_bytes(c.port, "/v1/" + keys[8].replace("_", "%5F"), []),
        # Caddy refuses a method longer than 32 bytes (405, not logged): a key's first 32 bytes fit.
        request_bytes(c.port, "/v1/things", [], method=keys[9][:32]),
    ]
    try:
        statuses = [(await raw_request(c.port, request))[0] for request in requests]
    finally:
        await asyncio.to_thread(c.stop)
    log = (tmp_path / "caddy" / "caddy.log").read_bytes()
    assert_no_secret(log, [*keys[:9], keys[9][:32]])
    # Not silence: one error line per request, saying what failed, with the request cut as documented.
    errors = [line for line in log.splitlines() if b'"logger":"http.log.error"' in line]
    assert len(errors) == len(requests) and all(b"connection refused" in line for line in errors), log
    assert [json.loads(line)["request"]["uri"] for line in errors] == [
        "/v1/things?[redacted]",
        "/v1/things/gw_live_[redacted]",
        "/v1/gw%[redacted]",
        "/v1/things",
    ]
    assert statuses == [503] * len(requests)
