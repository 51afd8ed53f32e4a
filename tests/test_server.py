"""The HTTP server under `gateway serve`: requests its parser refuses, sent as raw bytes over a socket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.keys import CHECKSUM_LEN
from tests.conftest import GatewayProcess, Services, World, start_gateway


def _request(*header_lines: bytes, request_line: bytes = b"GET /auth/nginx HTTP/1.1") -> bytes:
    head = [request_line, b"Host: gw", b"X-Original-Method: GET", b"X-Original-URI: /v1/things", *header_lines]
    return b"\r\n".join(head) + b"\r\n\r\n"


# Each request carries the key where the parser refuses it (KEY is replaced by the real key).
MALFORMED = {
    "bare CR after the value": _request(b"Authorization: Bearer KEY\r"),
    "CR in the value": _request(b"Authorization: Bearer KEY\rx"),
    "NUL in the value": _request(b"Authorization: Bearer KEY\x00x"),
    "NUL in the name": _request(b"Author\x00ization: Bearer KEY"),
    "obs-fold": _request(b"Authorization: Bearer", b" KEY"),
    "obs-fold after a header": _request(b"X-Note: a", b"\tAuthorization: Bearer KEY"),
    "space before the colon": _request(b"Authorization : Bearer KEY"),
    "no colon": _request(b"Authorization Bearer KEY"),
    "over-long header line": _request(b"Authorization: Bearer KEY" + b"A" * 9000),
    "over-long header name": _request(b"KEY" * 3000 + b": x"),
    "bad request line": _request(request_line=b"GET /auth/nginx?KEY HTTP/1.1 extra"),
    "key as the method": _request(request_line=b"KEY /auth/nginx HTTP/1.1"),
    "control byte in the target": _request(request_line=b"GET /auth/\x01KEY HTTP/1.1"),
    "over-long request line": _request(request_line=b"GET /auth/nginx?KEY" + b"A" * 9000 + b" HTTP/1.1"),
    "bad content length": _request(b"Content-Length: KEY"),
    "bad transfer encoding": _request(b"Transfer-Encoding: KEY"),
    "bad chunk size": _request(b"Transfer-Encoding: chunked", request_line=b"POST /v1/keys/verify HTTP/1.1")
    + b"KEY\r\n{}\r\n0\r\n\r\n",
    "bad trailer": _request(b"Transfer-Encoding: chunked", request_line=b"POST /v1/keys/verify HTTP/1.1")
    + b"2\r\n{}\r\n0\r\nAuthorization : Bearer KEY\r\n\r\n",
}


async def _exchange(port: int, data: bytes) -> bytes:
    """Send the bytes, read the whole answer (the server closes the connection after a refusal)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()


def _pieces(key: str) -> list[str]:
    """The key, its id and its secret, and every 8-character run of its id, secret and checksum."""
    _prefix, _env, key_id, rest = key.split("_", 3)
    secret = rest[:-CHECKSUM_LEN]
    tail = key_id + rest
    return [key, key_id, secret, rest, *(tail[i : i + 8] for i in range(len(tail) - 7))]


@pytest.fixture
async def gateway(services: Services, world: World, tmp_path: Path) -> AsyncIterator[GatewayProcess]:
    gw = await start_gateway(services, tmp_path, "server", config_yaml="log: {access: true}\n")
    yield gw
    gw.stop()


async def test_malformed_requests_echo_nothing(gateway: GatewayProcess, world: World) -> None:
    """A request the HTTP parser refuses gets a fixed JSON error, 401 to a proxy's call (nginx's
    auth_request logs any other status as an error, with the client's request line) and 400 elsewhere;
    neither the answer nor the logs hold any of its bytes, and nothing is logged with a traceback."""
    key = (await world.key(orgs=[world.org_a]))["key"]
    answers = {}
    for name, template in MALFORMED.items():
        raw = await _exchange(gateway.port, template.replace(b"KEY", key.encode()))
        head, _, body = raw.partition(b"\r\n\r\n")
        answers[name] = raw
        status = b" 400 " if b" /v1/" in template.partition(b"\r\n")[0] else b" 401 "
        assert head.startswith(b"HTTP/1.1" + status) or head.startswith(b"HTTP/1.0" + status), (name, raw[:300])
        assert b"x-auth-error: invalid_request" in head.lower(), (name, head)
        error = json.loads(body)["error"]
        assert error["code"] == "invalid_request", (name, body)
        assert set(error) == {"code", "message"}, (name, body)
    await asyncio.sleep(0.2)  # the last log lines
    logs = gateway.logs()
    for piece in _pieces(key):
        leaked = [name for name, raw in answers.items() if piece.encode() in raw]
        assert not leaked, (piece, leaked)
        assert piece not in logs, (piece, logs[-3000:])
    assert "Traceback" not in logs, logs[-3000:]
    assert logs.count("malformed HTTP request refused (") >= len(MALFORMED), logs[-3000:]
    # A well-formed request on the same server still works.
    ok = await _exchange(gateway.port, _request(f"Authorization: Bearer {key}".encode(), b"Connection: close"))
    assert ok.startswith(b"HTTP/1.1 200 "), ok[:300]


async def test_a_key_in_the_path_is_refused_and_never_logged(gateway: GatewayProcess, world: World) -> None:
    """Found by review: the access log records the path, so a key a client put in a path segment (the
    original URI, or the Envoy endpoint's own path) sat in the logs. It is refused and redacted."""
    key = (await world.key(orgs=[world.org_a]))["key"]
    requests = [
        b"GET /auth/envoy/v1/things/" + key.encode() + b" HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
        _request(b"Connection: close").replace(b"X-Original-URI: /v1/things", b"X-Original-URI: /v1/" + key.encode()),
        b"GET /nowhere/" + key.encode() + b" HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    ]
    answers = [await _exchange(gateway.port, r) for r in requests]
    assert answers[0].startswith(b"HTTP/1.1 401 ") and b"invalid_request" in answers[0], answers[0][:300]
    assert answers[1].startswith(b"HTTP/1.1 401 ") and b"invalid_request" in answers[1], answers[1][:300]
    assert answers[2].startswith(b"HTTP/1.1 404 "), answers[2][:300]
    await asyncio.sleep(0.2)
    logs = gateway.logs()
    assert "/nowhere/gw_live_[redacted]" in logs, logs[-2000:]
    for piece in _pieces(key):
        assert piece not in logs, (piece, logs[-3000:])
        assert not any(piece.encode() in a for a in answers), piece


@pytest.fixture
async def impatient(services: Services, world: World, tmp_path: Path) -> AsyncIterator[GatewayProcess]:
    gw = await start_gateway(
        services, tmp_path, "impatient", config_yaml="server:\n  header_timeout_s: 1\n  body_timeout_s: 1\n"
    )
    yield gw
    gw.stop()


async def test_a_request_head_dripped_slowly_is_cut(impatient: GatewayProcess) -> None:
    """A client sending its head a line at a time holds a connection for good unless the head has a
    deadline: a byte every 0.3 s reset nothing, and aiohttp kept the connection 75 s (review of issue 9)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", impatient.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n")
    started = time.monotonic()

    async def drip() -> None:
        with contextlib.suppress(ConnectionError):
            for i in range(30):
                await asyncio.sleep(0.3)
                writer.write(b"X-Drip-%d: x\r\n" % i)
                await writer.drain()

    dripping = asyncio.create_task(drip())
    try:
        got = await asyncio.wait_for(reader.read(), 8)
        waited = time.monotonic() - started
    finally:
        dripping.cancel()
        writer.close()
    assert got == b"" and waited < 5, (got[:200], waited)
    assert "request head not received within 1 s" in impatient.logs()


async def test_idle_connections_and_whole_heads_are_not_cut(impatient: GatewayProcess) -> None:
    """The deadline runs from a head's first byte: a connection idle before it (a proxy's pooled
    keep-alive connection) is not cut, and a head that arrives in time is answered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", impatient.port)
    try:
        for _ in range(2):
            await asyncio.sleep(1.5)  # idle longer than the head deadline
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n")
            await asyncio.sleep(0.5)  # half of it arrives late, within the deadline
            writer.write(b"Accept: */*\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200 "), head
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
    finally:
        writer.close()


async def test_a_body_that_does_not_arrive_is_408(impatient: GatewayProcess) -> None:
    """A body announced and not sent held the handler until the client gave up; now 408 within
    server.body_timeout_s, and the connection closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", impatient.port)
    writer.write(
        b"POST /v1/keys/verify HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"key": '
    )
    started = time.monotonic()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 8)
    waited = time.monotonic() - started
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    body = await reader.readexactly(length)
    writer.close()
    assert head.startswith(b"HTTP/1.1 408 ") and waited < 5, (head, waited)
    assert b"connection: close" in head.lower(), head
    assert json.loads(body)["error"]["code"] == "request_timeout"


async def test_a_client_leaving_mid_body_is_not_an_error(gateway: GatewayProcess) -> None:
    """A client closing its connection half-way through a body was logged as an unexpected error with a
    traceback (and answered 503 to nobody)."""
    for path in (b"/v1/keys/verify", b"/v1/keys", b"/ui/session"):
        _reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(
            b"POST " + path + b" HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            b'Authorization: Bearer gw_live_x\r\nContent-Length: 1000\r\n\r\n{"key": "gw'
        )
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.close()
    await asyncio.sleep(0.5)
    logs = gateway.logs()
    assert "Traceback" not in logs and "unexpected error" not in logs, logs[-3000:]


async def test_control_bytes_in_an_id_are_refused(gateway: GatewayProcess, world: World) -> None:
    """`/v1/keys/%00` reached Postgres, which refuses a NUL in text: answered 503 auth_unavailable with a
    traceback. Any path id that is not an id is now 400 invalid_request."""
    key = (await world.key(orgs=[world.org_a], role="owner"))["key"]
    for target in (b"/v1/keys/%00", b"/v1/keys/a%00b/revoke", b"/v1/orgs/%01/members", b"/v1/keys/%C3%A9"):
        method = b"POST" if target.endswith(b"revoke") else b"GET"
        raw = await _exchange(
            gateway.port,
            method + b" " + target + b" HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer " + key.encode() + b"\r\n"
            b"Content-Length: 0\r\nConnection: close\r\n\r\n",
        )
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 "), (target, raw[:300])
        assert json.loads(body)["error"]["code"] == "invalid_request", (target, body)
    await asyncio.sleep(0.2)
    assert "Traceback" not in gateway.logs(), gateway.logs()[-3000:]


async def test_a_body_drained_after_the_answer_does_not_start_the_head_deadline(impatient: GatewayProcess) -> None:
    """Found by review: body bytes aiohttp drains after answering (a 401 before the body was read) were
    taken for the start of a head, so an idle keep-alive connection was cut a deadline later."""
    reader, writer = await asyncio.open_connection("127.0.0.1", impatient.port)
    try:
        writer.write(b"POST /auth/nginx HTTP/1.1\r\nHost: gw\r\nContent-Length: 4\r\n\r\n")
        for part in (b"a", b"bcd"):
            await asyncio.sleep(0.2)
            writer.write(part)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        await reader.readexactly(int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0]))
        await asyncio.sleep(1.5)  # idle past the head deadline
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 "), head
    finally:
        writer.close()


async def test_a_malformed_body_sent_later_is_400_not_408(impatient: GatewayProcess) -> None:
    """A chunked body the parser refuses, arriving after the head, left the handler waiting for the body
    until 408; the reader now gets the parser's error."""
    reader, writer = await asyncio.open_connection("127.0.0.1", impatient.port)
    try:
        writer.write(b"POST /v1/keys/verify HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n")
        await asyncio.sleep(0.2)
        writer.write(b"zz\r\n{}\r\n0\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 400 "), head
    finally:
        writer.close()
