"""Every CLI command, through the real entry point, including bad arguments."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import pytest

from gateway._services import free_port
from gateway.data.schema import migration_files
from tests.conftest import (
    ROOT,
    GatewayProcess,
    Services,
    World,
    gateway_env,
    nginx_headers,
    start_gateway,
    write_test_config,
)


class Cli:
    def __init__(self, services: Services, config: str) -> None:
        self.services = services
        self.config = config

    def run(self, *args: str, json_out: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "gateway", "--config", self.config, *(["--json"] if json_out else []), *args]
        return subprocess.run(
            cmd, capture_output=True, text=True, timeout=60, env=gateway_env(self.services), cwd=ROOT, check=False
        )

    def ok(self, *args: str) -> Any:
        r = self.run(*args)
        assert r.returncode == 0, r.stderr
        assert "Traceback" not in r.stderr
        return json.loads(r.stdout)

    def fails(self, *args: str, code: int = 1) -> str:
        r = self.run(*args)
        assert r.returncode == code, (r.stdout, r.stderr)
        assert "Traceback" not in r.stderr
        assert r.stdout == ""
        return r.stderr


@pytest.fixture
def cli(services: Services, clean: None, tmp_path: Any) -> Cli:
    return Cli(services, str(write_test_config(tmp_path / "cli.yaml")))


def test_full_lifecycle(cli: Cli) -> None:
    assert cli.ok("migrate") == {"applied": []}  # idempotent: the session already migrated
    org = cli.ok("orgs", "create", "Acme")
    assert set(org) == {"id", "name"} and org["name"] == "Acme"
    user = cli.ok("users", "create", "Dev@Example.com")
    assert user["email"] == "dev@example.com"
    assert cli.ok("members", "set", org["id"], user["id"], "admin")["role"] == "admin"
    project = cli.ok("projects", "create", org["id"], "web")
    assert project["org_id"] == org["id"] and project["name"] == "web"
    key = cli.ok(
        "keys",
        "create",
        "--user",
        user["id"],
        "--name",
        "ci",
        "--role",
        "member",
        "--org",
        org["id"],
        "--project",
        project["id"],
        "--scope",
        "calls:read",
        "--expires-in",
        "30d",
        "--env",
        "test",
        "--allow-ip",
        "10.0.0.0/8",
        "--rate-limit",
        "100/1m",
    )
    assert key["key"].startswith("gw_test_" + key["id"] + "_")
    assert key["orgs"] == [org["id"]] and key["projects"] == [project["id"]]
    assert key["scopes"] == ["calls:read"] and key["allowed_ips"] == ["10.0.0.0/8"]
    assert key["rate_limit"] == "100/1m" and key["status"] == "active" and key["expires_at"]
    listed = cli.ok("keys", "list", "--user", user["id"])
    assert [k["id"] for k in listed] == [key["id"]]
    assert "key" not in listed[0]  # the raw key is shown once only
    assert [k["id"] for k in cli.ok("keys", "list", "--org", org["id"])] == [key["id"]]
    shown = cli.ok("keys", "show", key["id"])
    assert shown["id"] == key["id"] and "key" not in shown
    rotated = cli.ok("keys", "rotate", key["id"], "--grace", "1h")
    assert rotated["id"] != key["id"] and rotated["key"] and rotated["rotated_from"] == key["id"]
    assert rotated["scopes"] == ["calls:read"] and rotated["allowed_ips"] == ["10.0.0.0/8"]
    assert cli.ok("keys", "show", key["id"])["rotated_to"] == rotated["id"]
    revoked = cli.ok("keys", "revoke", rotated["id"])
    assert revoked["status"] == "revoked" and revoked["revoked_at"]
    assert cli.ok("members", "remove", org["id"], user["id"])["removed"] is True
    events = cli.ok("audit", "list", "--org", org["id"])
    assert [e["type"] for e in events][:2] == ["membership.changed", "api_key.revoked"]
    assert (
        cli.ok("audit", "list", "--org", org["id"], "--type", "api_key.created", "--limit", "1")[0]["key_id"]
        == key["id"]
    )
    assert cli.ok("audit", "list", "--org", org["id"], "--since", "2999-01-01") == []
    r = cli.run("audit", "list", "--org", org["id"], json_out=False)
    assert r.returncode == 0 and "membership.changed" in r.stdout
    all_keys = cli.ok("keys", "list")
    assert len(all_keys) == 2  # revoked and rotated keys stay for audit


def test_invitations_from_the_command_line(cli: Cli) -> None:
    org = cli.ok("orgs", "create", "Acme")
    user = cli.ok("users", "create", "dev@example.com")
    invited = cli.ok("members", "invite", org["id"], "dev@example.com", "member")
    assert (invited["status"], invited["user_id"], invited["role"]) == ("pending", user["id"], "member")
    assert [i["id"] for i in cli.ok("invitations", "list", "--user", user["id"])] == [invited["id"]]
    assert [i["id"] for i in cli.ok("invitations", "list", "--org", org["id"])] == [invited["id"]]
    assert cli.ok("keys", "list", "--org", org["id"]) == []  # not a member yet
    accepted = cli.ok("invitations", "accept", invited["id"])
    assert accepted["status"] == "accepted"
    assert cli.ok("invitations", "list", "--user", user["id"]) == []
    assert "is accepted" in cli.fails("invitations", "decline", invited["id"])
    # A member's role is changed at once.
    assert cli.ok("members", "invite", org["id"], "dev@example.com", "admin")["status"] == "member"
    other = cli.ok("members", "invite", org["id"], "ops@example.com", "viewer")
    assert cli.ok("invitations", "withdraw", other["id"])["status"] == "revoked"
    assert "no invitation" in cli.fails("invitations", "accept", "inv_nope")
    assert [e["type"] for e in cli.ok("audit", "list", "--org", org["id"])][:2] == [
        "invitation.revoked",
        "invitation.created",
    ]


def test_table_output_is_readable(cli: Cli) -> None:
    org = cli.ok("orgs", "create", "Acme")
    r = cli.run("keys", "list", json_out=False)
    assert r.returncode == 0 and r.stdout.strip() == "(none)"
    r = cli.run("keys", "show", "nope", json_out=False)
    assert r.returncode == 1 and "not_found" in r.stderr
    r = cli.run("orgs", "create", "Other", json_out=False)
    assert r.returncode == 0 and "name" in r.stdout and "Other" in r.stdout
    assert org["id"] not in r.stdout


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (("bogus",), 2, "invalid choice"),
        (("keys",), 2, "required"),
        (("keys", "create", "--name", "x", "--role", "admin"), 2, "--user"),
        (("keys", "create", "--user", "u", "--name", "x", "--role", "admin", "--env", "prod"), 2, "invalid choice"),
        (
            (
                "keys",
                "create",
                "--user",
                "u",
                "--name",
                "x",
                "--role",
                "admin",
                "--expires-in",
                "1d",
                "--expires-at",
                "2030-01-01",
            ),
            2,
            "not allowed with",
        ),
        (("serve", "--port", "http"), 2, "invalid int"),
        (("--frobnicate", "migrate"), 2, "unrecognized"),
        (("audit", "list"), 2, "--org"),
        (("audit", "list", "--org", "o", "--limit", "-1"), 2, "from 1 to 1000"),
        (("audit", "list", "--org", "o", "--since", "yesterday"), 2, "ISO 8601"),
    ],
)
def test_bad_arguments(cli: Cli, args: tuple[str, ...], code: int, needle: str) -> None:
    assert needle in cli.fails(*args, code=code)


def test_bad_values_are_clear_errors(cli: Cli) -> None:
    org = cli.ok("orgs", "create", "Acme")
    user = cli.ok("users", "create", "a@example.com")
    assert "invalid_request" in cli.fails("users", "create", "not-an-email")
    assert "conflict" in cli.fails("users", "create", "a@example.com")
    assert "invalid choice: 'god'" in cli.fails("members", "set", org["id"], user["id"], "god", code=2)
    assert "not_found" in cli.fails("members", "set", "org_nope", user["id"], "admin")
    assert "not_found" in cli.fails("members", "remove", org["id"], user["id"])
    assert "not_found" in cli.fails("projects", "create", "org_nope", "web")
    base = ("keys", "create", "--user", user["id"], "--name", "k", "--role", "admin")
    assert "not a member" in cli.fails(*base, "--org", org["id"])
    cli.ok("members", "set", org["id"], user["id"], "admin")
    assert "expires_in" in cli.fails(*base, "--expires-in", "soon")
    assert "expires_at" in cli.fails(*base, "--expires-at", "yesterday")
    assert "future" in cli.fails(*base, "--expires-at", "2001-01-01T00:00:00Z")
    assert "scope" in cli.fails(*base, "--scope", "not a pattern")
    assert "allow" in cli.fails(*base, "--allow-ip", "300.1.1.1")
    assert "rate limit" in cli.fails(*base, "--rate-limit", "lots")
    assert "project" in cli.fails(*base, "--project", "prj_nope")
    assert "not_found" in cli.fails("keys", "create", "--user", "usr_nope", "--name", "k", "--role", "admin")
    assert "not_found" in cli.fails("keys", "revoke", "nope")
    assert "not_found" in cli.fails("keys", "rotate", "nope")
    key = cli.ok(*base)
    cli.ok("keys", "revoke", key["id"])
    assert "conflict" in cli.fails("keys", "rotate", key["id"])
    assert "grace" in cli.fails("keys", "rotate", key["id"], "--grace", "forever")


def test_database_down_is_a_clear_error(services: Services, tmp_path: Any) -> None:
    config = write_test_config(tmp_path / "c.yaml", db="database: {connect_retries: 1}\n")
    env = gateway_env(services)
    env["GATEWAY_DATABASE_URL"] = "postgresql://postgres@127.0.0.1:1/postgres"
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "--config", str(config), "orgs", "create", "x"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
        check=False,
    )
    assert r.returncode == 1
    assert "cannot connect to Postgres" in r.stderr and "Traceback" not in r.stderr


def test_migrate_from_several_replicas_at_once(services: Services, tmp_path: Any) -> None:
    """Concurrent `gateway migrate` runs are serialised by an advisory lock."""
    config = write_test_config(tmp_path / "m.yaml")
    env = gateway_env(services)
    env["GATEWAY_DATABASE_URL"] = services.pg.url.rsplit("/", 1)[0] + "/fresh"
    subprocess.run(["psql", services.pg.url, "-qc", "DROP DATABASE IF EXISTS fresh"], check=True, capture_output=True)
    subprocess.run(["psql", services.pg.url, "-qc", "CREATE DATABASE fresh"], check=True, capture_output=True)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "gateway", "--config", str(config), "--json", "migrate"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    applied = [json.loads(o)["applied"] for o, _ in outs]
    assert sorted(map(len, applied)) == [0, 0, 0, len(migration_files())]  # one runner applied them all


def _serve(
    services: Services, tmp_path: Path, *args: str, config: str = "", **env: str
) -> subprocess.CompletedProcess[str]:
    """`gateway serve`, expected to give up at start-up; INFO logs, so a premature "serving" would show."""
    path = write_test_config(tmp_path / "serve.yaml", extra="log_level: INFO\n" + config)
    return subprocess.run(
        [sys.executable, "-m", "gateway", "--config", str(path), "serve", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**gateway_env(services), **env},
        cwd=ROOT,
        check=False,
    )


def _one_line(r: subprocess.CompletedProcess[str], status: int) -> str:
    assert r.returncode == status, r.stderr
    assert "serving" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_on_a_busy_port_is_one_line(services: Services, tmp_path: Path, workers: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = _serve(services, tmp_path, "--port", str(port), "--workers", workers)
    assert _one_line(r, 1) == f"gateway: cannot listen on 127.0.0.1:{port}: address already in use"


def test_serve_without_its_policy_file_is_one_line(services: Services, tmp_path: Path) -> None:
    r = _serve(services, tmp_path, "--port", str(free_port()), config=f"policy_file: {tmp_path}/nope.yaml\n")
    line = _one_line(r, 1)  # part of starting, like the port and Postgres
    assert line.startswith("gateway: config error: ") and "nope.yaml" in line


def test_serve_without_postgres_is_one_line(services: Services, tmp_path: Path) -> None:
    r = _serve(
        services,
        tmp_path,
        "--port",
        str(free_port()),
        "--workers",
        "2",
        config="database: {connect_retries: 1}\n",
        GATEWAY_DATABASE_URL="postgresql://postgres@127.0.0.1:1/postgres",
    )
    assert _one_line(r, 1).startswith("gateway: cannot connect to Postgres at postgresql://postgres@127.0.0.1:1/")


async def _get(url: str, **headers: str) -> tuple[int, Any, dict[str, str]]:
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as r:
        return r.status, json.loads(await r.text() or "null"), dict(r.headers)


async def _stopped(gw: GatewayProcess, timeout_s: float = 10) -> float:
    """Seconds until the gateway exited."""
    t0 = time.monotonic()
    await asyncio.to_thread(gw.proc.wait, timeout_s)
    return time.monotonic() - t0


async def _logged(gw: GatewayProcess, line: str, times: int = 1, timeout_s: float = 10) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if gw.logs().count(line) >= times:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{line!r} not logged {times} times: {gw.logs()}")


def _workers(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


async def test_sigterm_drains_then_stops(services: Services, world: World, tmp_path: Path) -> None:
    key = (await world.key(orgs=[world.org_a]))["key"]
    gw = await start_gateway(services, tmp_path, "drain", config_yaml="server: {drain_s: 1.5}\n")
    try:
        assert (await _get(gw.url + "/readyz"))[0] == 200
        t0 = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        status, body, _ = await _get(gw.url + "/readyz")
        while status == 200 and time.monotonic() - t0 < 1:
            status, body, _ = await _get(gw.url + "/readyz")
        assert (status, body["status"]) == (503, "draining")
        # Everything else is served as usual, asking the proxy to close its connection.
        assert (await _get(gw.url + "/healthz"))[0] == 200
        status, _, headers = await _get(gw.url + "/auth/nginx", **nginx_headers(key))
        assert status == 200 and headers["X-Org"] == world.org_a and headers["Connection"] == "close"
        await _stopped(gw)
        assert time.monotonic() - t0 >= 1.5
    finally:
        gw.stop()
    assert gw.proc.returncode == 0 and _refused(gw.port)
    assert "SIGTERM: draining for 1.5 s" in gw.logs() and "Traceback" not in gw.logs()


@pytest.mark.parametrize(
    "signals", [[signal.SIGINT], [signal.SIGTERM, signal.SIGTERM]], ids=["sigint", "sigterm-twice"]
)
async def test_stopping_at_once(services: Services, clean: None, tmp_path: Path, signals: list[int]) -> None:
    """Ctrl-C, or a second SIGTERM during the drain, stops without waiting for the drain."""
    gw = await start_gateway(services, tmp_path, "now", config_yaml="server: {drain_s: 60}\n")
    try:
        for sig in signals:
            gw.proc.send_signal(sig)
            if sig == signal.SIGTERM:
                await _logged(gw, "SIGTERM: draining")
        assert await _stopped(gw) < 5
    finally:
        gw.stop()
    assert gw.proc.returncode == 0 and "Traceback" not in gw.logs()


async def test_workers_auto_starts_one_per_core(services: Services, clean: None, tmp_path: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    gw = await start_gateway(services, tmp_path, "wauto", "--workers", "auto")
    try:
        await _logged(gw, "gateway serving on", cores)
        assert len(_workers(gw.proc.pid)) == (cores if cores > 1 else 0)  # one core: served in-process
        # argon2 threads: each process takes its share of the cores (`keys.verify_threads: auto`).
        await _logged(gw, "argon2: 1 verification thread(s) in this process", cores)
    finally:
        gw.stop()


async def test_one_worker_takes_every_core_for_argon2(services: Services, clean: None, tmp_path: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    gw = await start_gateway(services, tmp_path, "wone", "--workers", "1")
    try:
        await _logged(gw, f"argon2: {cores} verification thread(s) in this process", 1)
    finally:
        gw.stop()


async def test_sigterm_drains_every_worker(services: Services, clean: None, tmp_path: Path) -> None:
    gw = await start_gateway(services, tmp_path, "wdrain", "--workers", "2", config_yaml="server: {drain_s: 1.5}\n")
    try:
        await _logged(gw, "gateway serving on", 2)  # said once both listen
        t0 = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        await _logged(gw, "SIGTERM: draining", 2)
        # The kernel spreads new connections over both workers: every one of them is draining.
        answers = [await _get(gw.url + "/readyz") for _ in range(10)]
        assert {(status, body["status"]) for status, body, _ in answers} == {(503, "draining")}
        assert (await _get(gw.url + "/healthz"))[0] == 200
        await _stopped(gw)
        assert time.monotonic() - t0 >= 1.5
    finally:
        gw.stop()
    assert gw.proc.returncode == 0 and _refused(gw.port)


async def test_a_worker_dying_stops_the_others(services: Services, clean: None, tmp_path: Path) -> None:
    gw = await start_gateway(services, tmp_path, "wdie", "--workers", "2")
    try:
        await _logged(gw, "gateway serving on", 2)  # /healthz answers once one listens; kill after both do
        workers = _workers(gw.proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[0], signal.SIGKILL)
        await _stopped(gw)
    finally:
        gw.stop()
    assert gw.proc.returncode == 1 and "a worker exited unexpectedly" in gw.logs()
    assert _refused(gw.port)


def test_tokens_and_signing_keys_from_the_command_line(cli: Cli) -> None:
    cli.ok("migrate")
    org = cli.ok("orgs", "create", "Acme")
    user = cli.ok("users", "create", "dev@example.com")
    cli.ok("members", "set", org["id"], user["id"], "member")
    pair = cli.ok("tokens", "issue", "--user", user["id"], "--org", org["id"], "--scope", "calls:read", "--ttl", "5m")
    assert (pair["token_type"], pair["expires_in"], pair["scope"]) == ("Bearer", 300, "calls:read")
    assert "exceeds" in cli.fails("tokens", "issue", "--user", user["id"], "--org", org["id"], "--role", "owner")
    assert "not a member" in cli.fails("tokens", "issue", "--user", user["id"], "--org", "org_nope")
    assert "grants" in cli.fails("tokens", "issue", "--user", user["id"], "--org", org["id"], "--scope", "keys:*x")
    before = {k["kid"]: k["state"] for k in cli.ok("signing-keys", "list")}
    old = next(kid for kid, state in before.items() if state == "current")
    rotated = cli.ok("signing-keys", "rotate")
    after = {k["kid"]: k["state"] for k in cli.ok("signing-keys", "list")}
    assert before[rotated["current"]] == "next" and after[rotated["current"]] == "current"
    assert (after[rotated["next"]], after[old]) == ("next", "previous")
    assert list(after.values()).count("current") == 1 and list(after.values()).count("next") == 1
    listed = cli.run("signing-keys", "list")
    assert "PRIVATE" not in listed.stdout and "private" not in listed.stdout


def test_every_record_can_be_listed(cli: Cli) -> None:
    """Whatever `keys create` needs (a user id, an org id, a project id) a `list` finds."""
    org = cli.ok("orgs", "create", "Acme")
    other = cli.ok("orgs", "create", "Beta")
    alice = cli.ok("users", "create", "alice@example.com")
    bob = cli.ok("users", "create", "bob@example.com")
    cli.ok("members", "set", org["id"], alice["id"], "admin")
    cli.ok("members", "set", other["id"], alice["id"], "viewer")
    project = cli.ok("projects", "create", org["id"], "web")
    bot = cli.ok("service-accounts", "create", org["id"], "ci-bot", "--role", "member")
    invite = cli.ok("members", "invite", org["id"], "bob@example.com", "viewer")
    orgs = {o["name"]: o for o in cli.ok("orgs", "list")}
    assert set(orgs) == {"Acme", "Beta"} and orgs["Acme"]["id"] == org["id"]
    assert (orgs["Acme"]["members"], orgs["Beta"]["members"]) == (2, 1)  # alice and the bot; alice
    everyone = cli.ok("users", "list")
    assert [(u["id"], u["kind"]) for u in everyone] == [
        (alice["id"], "human"),
        (bob["id"], "human"),
        (bot["id"], "service"),
    ]
    assert {u["id"] for u in cli.ok("users", "list", "--org", other["id"])} == {alice["id"]}
    members = cli.ok("members", "list", org["id"])
    assert {(m["user_id"], m["role"]) for m in members} == {(alice["id"], "admin"), (bot["id"], "member")}
    assert cli.ok("projects", "list", org["id"]) == [{"id": project["id"], "org_id": org["id"], "name": "web"}]
    accounts = cli.ok("service-accounts", "list", org["id"])
    assert [(a["id"], a["name"], a["role"]) for a in accounts] == [(bot["id"], "ci-bot", "member")]
    assert [i["id"] for i in cli.ok("invitations", "list", "--org", org["id"])] == [invite["id"]]
    assert cli.ok("projects", "list", other["id"]) == [] and cli.ok("service-accounts", "list", other["id"]) == []
    for listing in ("members", "projects", "service-accounts"):
        assert "not_found: no org org_nope" in cli.fails(listing, "list", "org_nope")
    assert "not_found" in cli.fails("users", "list", "--org", "org_nope")
    r = cli.run("orgs", "list", json_out=False)
    assert r.returncode == 0 and r.stdout.splitlines()[0].split() == ["ID", "NAME", "MEMBERS", "CREATED"]


def test_json_goes_anywhere(cli: Cli) -> None:
    cli.ok("orgs", "create", "Acme")
    after = cli.run("orgs", "list", "--json", json_out=False)
    before = cli.run("--json", "orgs", "list", json_out=False)
    assert after.returncode == before.returncode == 0, (after.stderr, before.stderr)
    assert json.loads(after.stdout) == json.loads(before.stdout) != []
    r = cli.run("keys", "list", "--json", json_out=False)
    assert (r.returncode, json.loads(r.stdout)) == (0, [])


def test_version_and_help(cli: Cli) -> None:
    r = cli.run("--version", json_out=False)
    assert (r.returncode, r.stdout.strip()) == (0, "gateway 0.1.0")
    r = cli.run("keys", "create", "--help", json_out=False)
    assert r.returncode == 0 and "one of viewer, member, admin, owner" in r.stdout
    assert "invalid choice: 'god'" in cli.fails("members", "set", "o", "u", "god", code=2)


def _parsers(parser: Any) -> Any:
    yield parser
    for action in parser._actions:
        if action.choices and isinstance(action.choices, dict):
            for child in action.choices.values():
                yield from _parsers(child)


def test_every_option_and_command_says_what_it_is() -> None:
    from gateway.cli import build_parser

    seen = 0
    for parser in _parsers(build_parser()):
        for action in parser._actions:
            assert action.help, f"{parser.prog}: {action.dest} has no help"
            seen += 1
    assert seen > 100


def test_roles_come_from_the_config(services: Services, tmp_path: Path) -> None:
    roles = (
        "roles: {order: [reader, writer, boss], admin: boss,"
        " permissions: {reader: ['*:read'], writer: ['*'], boss: ['*']}}"
    )
    config = write_test_config(tmp_path / "roles.yaml", roles=roles)
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "--config", str(config), "members", "set", "--help"],
        capture_output=True, text=True, env=gateway_env(services), cwd=ROOT, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 0 and "one of reader, writer, boss" in r.stdout


def test_rate_limits_in_words(cli: Cli) -> None:
    org = cli.ok("orgs", "create", "Acme")
    user = cli.ok("users", "create", "a@example.com")
    cli.ok("members", "set", org["id"], user["id"], "admin")
    base = ("keys", "create", "--user", user["id"], "--role", "admin")
    for text in ("5/min", "100/hour", "10/sec", "1000/day", "3/2m"):
        assert cli.ok(*base, "--name", text, "--rate-limit", text)["rate_limit"] == text
    assert "rate limit" in cli.fails(*base, "--name", "x", "--rate-limit", "5/fortnight")


def test_tables_fit_a_terminal_in_local_time(services: Services, clean: None, tmp_path: Path) -> None:
    cli = Cli(services, str(write_test_config(tmp_path / "cli.yaml")))
    org = cli.ok("orgs", "create", "Acme")
    user = cli.ok("users", "create", "someone.with.a.rather.long.address@example.com")
    cli.ok("members", "set", org["id"], user["id"], "admin")
    long_name = "a key whose name goes on and on, far past what a column should hold"
    key = cli.ok(*("keys", "create", "--user", user["id"], "--role", "admin", "--name", long_name),
                 *("--expires-in", "30d", "--scope", "calls:read", "--allow-ip", "10.0.0.0/8"))  # fmt: skip
    env = {**gateway_env(services), "TZ": "Asia/Tokyo"}
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "--config", cli.config, "keys", "list"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert max(map(len, lines)) <= 160 and len(lines) == 2
    assert lines[0].split()[:4] == ["ID", "NAME", "USER", "ID"] and key["id"] in lines[1]
    assert long_name not in r.stdout and long_name[:30] in r.stdout and "…" in r.stdout
    expires = datetime.fromisoformat(key["expires_at"]).astimezone(ZoneInfo("Asia/Tokyo"))
    assert expires.strftime("%Y-%m-%d %H:%M:%S") in lines[1]  # local time, to the second
    assert key["expires_at"] not in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "--config", cli.config, "keys", "show", key["id"]],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=60, check=False,
    )  # fmt: skip
    assert long_name in r.stdout and expires.strftime("%Y-%m-%d %H:%M:%S") in r.stdout


def test_no_config_file_needed_when_the_environment_has_it_all(services: Services, clean: None, tmp_path: Path) -> None:
    env = gateway_env(services)

    def run(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway", *args], capture_output=True, text=True,
            env={**env, **extra}, cwd=tmp_path, timeout=60, check=False,
        )  # fmt: skip

    r = run("orgs", "list", "--json")
    assert (r.returncode, r.stderr, json.loads(r.stdout)) == (0, "", [])
    r = run("orgs", "list", GATEWAY_DATABASE_URL="")
    assert r.returncode == 2
    assert r.stderr == "gateway: config error: database.url: is required (or set GATEWAY_DATABASE_URL)\n"
    r = run("orgs", "list", GATEWAY_CONFIG=str(tmp_path / "missing.yaml"))  # named: it must be there
    assert (r.returncode, r.stderr) == (2, f"gateway: config error: config file not found: {tmp_path}/missing.yaml\n")


def test_signing_without_the_secret_is_one_line(services: Services, clean: None, tmp_path: Path) -> None:
    """It was a traceback (the change rolled back, but nothing said so plainly)."""
    config = write_test_config(tmp_path / "c.yaml")
    env = {k: v for k, v in gateway_env(services).items() if k != "GATEWAY_SIGNING_SECRET"}
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "--config", str(config), "signing-keys", "rotate"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=60, check=False,
    )  # fmt: skip
    assert (r.returncode, r.stderr) == (
        1, "gateway: cannot sign: tokens.signing_secret is not set (set GATEWAY_SIGNING_SECRET)\n",
    )  # fmt: skip
