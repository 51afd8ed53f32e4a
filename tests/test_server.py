"""The HTTP server under `gateway serve`: requests its parser refuses, sent as raw bytes over a socket."""

from __future__ import annotations

import asyncio
import json
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
    gw = await start_gateway(services, tmp_path, "server")
    yield gw
    gw.stop()


async def test_malformed_requests_echo_nothing(gateway: GatewayProcess, world: World) -> None:
    """A request the HTTP parser refuses gets a fixed 400 JSON error; neither the answer nor the logs hold
    any of its bytes, and nothing is logged with a traceback (item 5 of issue 9)."""
    key = (await world.key(orgs=[world.org_a]))["key"]
    answers = {}
    for name, template in MALFORMED.items():
        raw = await _exchange(gateway.port, template.replace(b"KEY", key.encode()))
        head, _, body = raw.partition(b"\r\n\r\n")
        answers[name] = raw
        assert head.startswith(b"HTTP/1.1 400 ") or head.startswith(b"HTTP/1.0 400 "), (name, raw[:300])
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
