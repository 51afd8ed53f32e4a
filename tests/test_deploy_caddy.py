"""deploy/caddy/Caddyfile, run in real Caddy in front of an echo upstream."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
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
