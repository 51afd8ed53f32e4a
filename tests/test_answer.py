"""Forward-auth answers written as one block (`gateway._answer`), read as raw bytes off a real socket of
`gateway serve`: framing, keep-alive per HTTP version, HEAD, and headers that could never be split."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway._answer import header_block
from tests.conftest import GatewayProcess, Services, World, start_gateway


@pytest.fixture
async def gateway(services: Services, tmp_path: Path) -> AsyncIterator[GatewayProcess]:
    gw = await start_gateway(services, tmp_path, "answer")
    yield gw
    gw.stop()


def _junk(key: str) -> str:
    return key[:-1] + ("0" if key[-1] != "0" else "1")  # a bad checksum


def _call(key: str, *, method: bytes = b"GET", version: bytes = b"1.1", extra: bytes = b"") -> bytes:
    return (
        method + b" /auth/nginx HTTP/" + version + b"\r\nHost: gw\r\nX-Original-Method: GET\r\n"
        b"X-Original-URI: /v1/things\r\nAuthorization: Bearer " + key.encode() + b"\r\n" + extra + b"\r\n"
    )


async def _answers(port: int, data: bytes, count: int) -> tuple[list[tuple[bytes, bytes]], bool]:
    """Send `data`, read `count` answers framed by their Content-Length; then whether the server closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        out = []
        for _ in range(count):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = int(_headers(head)["content-length"][0])
            body = await asyncio.wait_for(reader.readexactly(length), 10) if length and b"HEAD" not in data else b""
            out.append((head, body))
        try:
            rest = await asyncio.wait_for(reader.read(1), 1)
            closed = rest == b""
        except TimeoutError:
            closed = False
        return out, closed
    finally:
        writer.close()


def _headers(head: bytes) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in head.decode().split("\r\n")[1:]:
        if line:
            name, _, value = line.partition(":")
            found.setdefault(name.lower(), []).append(value.strip())
    return found


async def test_an_answer_is_framed_like_aiohttps(gateway: GatewayProcess, world: World) -> None:
    """A 200 and a 401 on one keep-alive connection (pipelined): each with one Content-Length matching
    its body, a Date, no Connection header on HTTP/1.1, and the identity or denial headers once each."""
    key = (await world.key(orgs=[world.org_a]))["key"]
    answers, closed = await _answers(gateway.port, _call(key) + _call(_junk(key)), 2)
    (ok_head, ok_body), (no_head, no_body) = answers
    assert ok_head.startswith(b"HTTP/1.1 200 OK\r\n") and ok_body == b""
    ok = _headers(ok_head)
    assert ok["content-length"] == ["0"] and len(ok["date"]) == 1 and "connection" not in ok
    assert ok["x-org"] == [world.org_a] and ok["x-auth-method"] == ["api_key"] and ok["cache-control"] == ["no-store"]
    assert ok["ratelimit-limit"] and ok["ratelimit-remaining"] and ok["ratelimit-reset"]
    assert no_head.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    no = _headers(no_head)
    assert no["content-length"] == [str(len(no_body))] and no["content-type"] == ["application/json"]
    assert no["x-auth-error"] == ["invalid_api_key"] and no["www-authenticate"] == ['Bearer error="invalid_api_key"']
    assert b'"invalid_api_key"' in no_body
    assert not closed


@pytest.mark.parametrize(
    ("version", "extra", "connection", "closes"),
    [
        (b"1.0", b"", None, True),  # HTTP/1.0 closes unless asked otherwise (nginx's default to an upstream)
        (b"1.0", b"Connection: keep-alive\r\n", "keep-alive", False),
        (b"1.1", b"Connection: close\r\n", "close", True),
        (b"1.1", b"", None, False),
    ],
)
async def test_keep_alive_follows_the_request(
    gateway: GatewayProcess, world: World, version: bytes, extra: bytes, connection: str | None, closes: bool
) -> None:
    key = (await world.key(orgs=[world.org_a]))["key"]
    ((head, _),), closed = await _answers(gateway.port, _call(key, version=version, extra=extra), 1)
    assert head.startswith(b"HTTP/" + version + b" 200 OK\r\n"), head
    assert _headers(head).get("connection") == ([connection] if connection else None), head
    assert closed == closes


async def test_head_gets_the_headers_without_a_body(gateway: GatewayProcess, world: World) -> None:
    """A HEAD call (a proxy may send the client's method) is answered with the same headers, the body's
    length and no body: a body would be read as the start of the next answer on the connection."""
    key = (await world.key(orgs=[world.org_a]))["key"]
    data = _call(_junk(key), method=b"HEAD") + _call(_junk(key), method=b"HEAD")
    answers, closed = await _answers(gateway.port, data, 2)
    for head, _ in answers:
        assert head.startswith(b"HTTP/1.1 401 "), head
        assert int(_headers(head)["content-length"][0]) > 0
    assert not closed


async def test_an_unusual_spelling_of_an_endpoint_is_answered_alike(gateway: GatewayProcess, world: World) -> None:
    """`gateway serve` answers `/auth/<proxy>` before routing; a target spelt otherwise (escaped, with a
    query) reaches the same handler through the app's router, and an unknown endpoint is a 404."""
    key = (await world.key(orgs=[world.org_a]))["key"]
    base = _call(key)
    data = b"".join(
        base.replace(b"/auth/nginx", target, 1)
        for target in (b"/auth/nginx", b"/auth/%6Eginx", b"/auth/nginx?x=1", b"/auth/envoy/v1/things")
    )
    answers, _ = await _answers(gateway.port, data, 4)
    assert [h.split(b"\r\n", 1)[0] for h, _ in answers] == [b"HTTP/1.1 200 OK"] * 4
    assert len({_headers(h)["x-key-id"][0] for h, _ in answers}) == 1
    ((head, _),), _ = await _answers(gateway.port, base.replace(b"/auth/nginx", b"/auth/nginxx", 1), 1)
    assert head.startswith(b"HTTP/1.1 404 "), head


@pytest.mark.parametrize("bad", ["a\r\nX-Role: owner", "a\nb", "a\rb", "a\x00b"])
def test_a_header_value_that_could_split_the_head_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="cannot be sent"):
        header_block([("X-Org", bad)])
    with pytest.raises(ValueError, match="cannot be sent"):
        header_block([(bad, "x")])
    assert header_block([("X-Org", "org_1"), ("X-Project", "")]) == b"X-Org: org_1\r\nX-Project: \r\n"
