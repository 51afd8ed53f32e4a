"""Log lines: JSON by default off a terminal, a request id on each line and answer, one line per decision."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway._services import free_port
from gateway.app import create_app
from gateway.config import DecisionLogConfig
from gateway.logs import DecisionLog, RequestIds, TextFormatter, json_formatter
from tests.conftest import (
    ROOT,
    Client,
    GatewayProcess,
    Services,
    World,
    gateway_env,
    make_config,
    nginx_headers,
    start_gateway,
    write_test_config,
)

_MADE = re.compile("[0-9a-f]{13,}")


def test_a_request_id_is_taken_from_a_trusted_proxy_only() -> None:
    ids = RequestIds()
    assert ids.begin("nginx-42.a:b", True) == "nginx-42.a:b"
    for sent, trusted in (("nginx-42", False), ("a b", True), ("x" * 65, True), ("é", True), ("a\r\nb", True)):
        made = ids.begin(sent, trusted)
        assert _MADE.fullmatch(made) and made != sent
    assert len({ids.begin(None, True) for _ in range(1000)}) == 1000
    assert RequestIds().begin(None, True)[:12] != ids.begin(None, True)[:12]  # each process its own prefix


async def test_every_answer_says_its_request_id(client: Client, world: World) -> None:
    k = await world.key(orgs=[world.org_a])
    sent = {"X-Request-Id": "edge-7f3a"}  # the test client is 127.0.0.1: a trusted proxy
    for r in (
        await client.get("/auth/nginx", headers={**nginx_headers(k["key"]), **sent}),
        await client.get("/auth/nginx", headers={**nginx_headers("gw_live_nope"), **sent}),
        await client.get("/v1/me", headers={"Authorization": f"Bearer {k['key']}", **sent}),
        await client.get("/v1/me", headers=sent),
        await client.get("/healthz", headers=sent),
        await client.get("/nowhere", headers=sent),
    ):
        assert r.headers.getall("X-Request-Id") == ["edge-7f3a"], r.url
    r = await client.get("/auth/nginx", headers=nginx_headers(k["key"]))
    assert _MADE.fullmatch(r.headers["X-Request-Id"])


async def test_an_untrusted_peer_cannot_choose_the_request_id(
    aiohttp_client: Any, services: Services, world: World
) -> None:
    """A client could otherwise write any id into our logs, or one that names another request."""
    cfg = make_config(services, forward_auth={"trusted_proxies": ["10.9.9.9/32"]})
    client = await aiohttp_client(create_app(cfg))
    k = await world.key(orgs=[world.org_a])
    for path, headers in (("/auth/nginx", nginx_headers(k["key"])), ("/v1/me", {})):
        r = await client.get(path, headers={**headers, "X-Request-Id": "chosen-by-client"})
        assert r.headers["X-Request-Id"] != "chosen-by-client" and _MADE.fullmatch(r.headers["X-Request-Id"])


def _decisions(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "gateway.forward" and r.getMessage() == "decision"]


async def test_each_decision_is_one_line_with_what_explains_it(
    aiohttp_client: Any, services: Services, world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "gateway")
    cfg = make_config(services, log={"decisions": {"sample_allowed": 1}})
    client = await aiohttp_client(create_app(cfg))
    k = await world.key(orgs=[world.org_a])
    ok = await client.get("/auth/nginx", headers={**nginx_headers(k["key"]), "X-Request-Id": "r-1"})
    other = {"X-Org-Id": world.org_b, "X-Request-Id": "r-2"}  # an org the key may not act in
    bad = await client.get("/auth/nginx", headers={**nginx_headers(k["key"]), **other})
    anonymous = await client.get("/auth/nginx", headers={**nginx_headers(None), "X-Request-Id": "r-3"})
    assert (ok.status, bad.status, anonymous.status) == (200, 403, 401)
    lines = _decisions(caplog)
    assert len(lines) == 3
    allowed, denied, missing = (vars(r) for r in lines)
    assert {f: allowed[f] for f in ("outcome", "code", "endpoint", "auth", "key_id", "org", "route", "client")} == {
        "outcome": "allow", "code": "ok", "endpoint": "nginx", "auth": "api_key", "key_id": k["id"],
        "org": world.org_a, "route": "GET /v1/things", "client": "127.0.0.1",
    }  # fmt: skip
    assert allowed["request_id"] == "r-1" and 0 < allowed["latency_ms"] < 5000
    assert (denied["outcome"], denied["code"], denied["key_id"], denied["request_id"]) == (
        "deny", "org_not_allowed", k["id"], "r-2",
    )  # fmt: skip
    assert (missing["code"], missing["auth"], missing["request_id"]) == ("missing_credentials", None, "r-3")
    secret = k["key"].rsplit("_", 1)[1]
    assert not any(secret[:12] in json.dumps(vars(r), default=str) for r in caplog.records)


@pytest.mark.parametrize(
    ("decisions", "allowed", "denied"),
    [
        ({}, (0, 3), 20),  # the defaults: 1 % of allowed decisions, every denial
        ({"sample_allowed": 0}, 0, 20),
        ({"sample_allowed": 1}, 20, 20),
        ({"sample_allowed": 1, "sample_denied": 0}, 20, 0),
        ({"level": "OFF"}, 0, 0),
        ({"level": "DEBUG"}, 0, 0),  # below log_level (INFO here): not written, and not even built
        ({"level": "WARNING", "sample_allowed": 0.5, "sample_denied": 0.5}, (3, 17), (3, 17)),
    ],
)
async def test_decision_lines_by_level_and_sampling(
    aiohttp_client: Any,
    services: Services,
    world: World,
    caplog: pytest.LogCaptureFixture,
    decisions: dict[str, Any],
    allowed: int | tuple[int, int],
    denied: int | tuple[int, int],
) -> None:
    caplog.set_level(logging.INFO, "gateway")
    client = await aiohttp_client(create_app(make_config(services, log={"decisions": decisions})))
    k = await world.key(orgs=[world.org_a])
    for _ in range(20):
        assert (await client.get("/auth/nginx", headers=nginx_headers(k["key"]))).status == 200
        assert (await client.get("/auth/nginx", headers=nginx_headers("gw_live_nope"))).status == 401
    lines = _decisions(caplog)
    counts = [sum(1 for r in lines if vars(r)["outcome"] == o) for o in ("allow", "deny")]
    for count, want in zip(counts, (allowed, denied), strict=True):
        assert (want[0] <= count <= want[1]) if isinstance(want, tuple) else count == want, counts
    assert all(r.levelno == logging.getLevelName(decisions.get("level", "INFO")) for r in lines)


def test_decision_log_config_is_checked() -> None:
    from gateway.config import config_from_mapping
    from gateway.errors import ConfigError

    base = {"database": {"url": "postgresql://x"}, "redis": {"url": "redis://x"}, "pepper": "p" * 32}
    for log, field in (
        ({"format": "xml"}, "log.format"),
        ({"decisions": {"level": "LOUD"}}, "log.decisions.level"),
        ({"decisions": {"sample_allowed": 2}}, "log.decisions.sample_allowed"),
        ({"decisions": {"sample_denied": -0.1}}, "log.decisions.sample_denied"),
    ):
        with pytest.raises(ConfigError, match=re.escape(field)):
            config_from_mapping({**base, "log": log}, env={})
    assert DecisionLog(DecisionLogConfig(level="off"), logging.getLogger("x")).level is None


def _record(msg: str, exc: bool = False, **extra: Any) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    record = logging.LogRecord("gateway.x", logging.ERROR, __file__, 1, msg, None, exc_info)
    record.request_id = "rid-1"
    for k, v in extra.items():
        setattr(record, k, v)
    return record


def test_formats() -> None:
    line = TextFormatter().format(_record("decision", outcome="deny", route="GET /a b", org=None))
    assert line.endswith(" ERROR gateway.x [rid-1] decision outcome=deny route='GET /a b' org=-")
    text = TextFormatter().format(_record("failed", exc=True, key_id="k1"))
    first, *trace = text.splitlines()
    assert first.endswith("[rid-1] failed key_id=k1") and trace[-1] == "ValueError: boom"
    one = json_formatter().format(_record("failed", exc=True, key_id="k1"))
    assert "\n" not in one  # a traceback stays one JSON line
    parsed = json.loads(one)
    assert {k: parsed[k] for k in ("level", "logger", "request_id", "message", "key_id")} == {
        "level": "ERROR", "logger": "gateway.x", "request_id": "rid-1", "message": "failed", "key_id": "k1",
    }  # fmt: skip
    assert "ValueError: boom" in parsed["exc_info"] and re.match(r"\d{4}-\d\d-\d\dT", parsed["time"])


async def test_a_served_gateway_logs_json_lines_off_a_terminal(
    services: Services, clean: None, world: World, tmp_path: Path
) -> None:
    """`log.format: auto` (the default; the test config says text, so it is set back here): stderr is a
    file, so every line is one JSON object, the decision's with the id the answer carried."""
    config = "log: {format: auto, decisions: {sample_allowed: 1}}"
    gw = await start_gateway(services, tmp_path, "json", config_yaml=config)
    k = await world.key(orgs=[world.org_a])
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(gw.url + "/auth/nginx", headers=nginx_headers(k["key"])) as r:
                assert r.status == 200
                rid = r.headers["X-Request-Id"]
            async with s.get(gw.url + "/auth/nginx", headers=nginx_headers("gw_live_nope")) as r:
                assert r.status == 401
        await asyncio.sleep(0.3)
    finally:
        gw.stop()
    lines = [json.loads(line) for line in gw.logs().splitlines()]
    assert any("serving" in line["message"] and line["request_id"] == "-" for line in lines)
    decisions = [line for line in lines if line["message"] == "decision"]
    assert [(d["outcome"], d["code"]) for d in decisions] == [("allow", "ok"), ("deny", "invalid_api_key")]
    assert decisions[0]["request_id"] == rid and decisions[0]["key_id"] == k["id"]
    assert k["key"] not in gw.logs()


async def test_a_stalled_stderr_never_stalls_a_decision(services: Services, clean: None, tmp_path: Path) -> None:
    """A log shipper that stops reading: the pipe fills, the writer thread waits, and lines queue up to
    a bound and are then dropped and counted. Decisions go on being answered throughout."""
    port = free_port()
    config = write_test_config(tmp_path / "stalled.yaml", extra="log: {format: json, access: true}")
    proc = subprocess.Popen(  # noqa: ASYNC220, S603 (started once, like tests/conftest.py's gateways)
        [sys.executable, "-m", "gateway", "--config", str(config), "serve", "--port", str(port)],
        env=gateway_env(services), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    gw = GatewayProcess(port, proc, tmp_path / "unused.log")
    read: list[bytes] = []

    def read_all() -> None:  # the shipper, once it reads again
        assert proc.stderr is not None
        while chunk := proc.stderr.read1(1 << 20):  # type: ignore[attr-defined]
            read.append(chunk)

    try:
        # A stalled log must never stall an answer: each has 10 s, where it takes a millisecond.
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            deadline = time.monotonic() + 20
            while True:
                try:
                    async with s.get(gw.url + "/healthz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
            headers = {**nginx_headers("gw_live_nope"), "X-Request-Id": "x" * 64}
            for _ in range(6_000):  # a decision line and an access line each: past the queue's bound
                async with s.get(gw.url + "/auth/nginx", headers=headers) as r:
                    assert r.status == 401
            reader = asyncio.ensure_future(asyncio.to_thread(read_all))
            await asyncio.sleep(1)
            async with s.get(gw.url + "/auth/nginx", headers=nginx_headers("gw_live_nope")) as r:
                assert r.status == 401  # the line that says how many were lost goes before this one's
            for _ in range(100):
                if b"log lines dropped" in b"".join(read):
                    break
                await asyncio.sleep(0.1)
    finally:
        gw.stop()
    await reader
    assert proc.stderr is not None
    proc.stderr.close()
    lost = [json.loads(line) for line in b"".join(read).splitlines() if b"log lines dropped" in line]
    assert len(lost) == 1 and lost[0]["level"] == "WARNING", lost
    assert int(lost[0]["message"].split()[0]) > 0
