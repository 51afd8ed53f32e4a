"""The fault-injection proxy itself, against a tiny threaded echo server."""

from __future__ import annotations

import asyncio
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from gateway._services import free_port
from tests._faultproxy import FaultProxy

TIMEOUT_S = 2.0


class EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), EchoHandler)
        self.accepted = 0
        self.endings: list[str] = []  # how each connection ended: "eof" or the exception's name

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server = self.server
        assert isinstance(server, EchoServer)
        server.accepted += 1
        sock: socket.socket = self.request
        try:
            while data := sock.recv(65536):
                sock.sendall(data)
            ending = "eof"
        except OSError as exc:  # a reset is what several tests expect; socketserver would print it
            ending = type(exc).__name__
        server.endings.append(ending)


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(TIMEOUT_S)


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[FaultProxy]:
    with FaultProxy(echo.port) as p:
        yield p
    assert p.errors == []


def connect(proxy: FaultProxy) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT_S)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def roundtrip(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    return recv_exactly(sock, len(data))


def eventually(check: Callable[[], bool], timeout_s: float = TIMEOUT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_pass_forwards_both_ways_in_order(proxy: FaultProxy) -> None:
    assert proxy.mode == "pass"
    with connect(proxy) as c:
        assert roundtrip(c, b"ping") == b"ping"
        for i in range(8):
            block = bytes([i]) * 65536
            assert roundtrip(c, block) == block


def test_eof_is_forwarded_after_the_data(proxy: FaultProxy, echo: EchoServer) -> None:
    with connect(proxy) as c:
        c.sendall(b"last words")
        c.shutdown(socket.SHUT_WR)
        assert recv_exactly(c, 10) == b"last words"
        assert c.recv(10) == b""
    assert eventually(lambda: echo.endings == ["eof"])


def test_slow_delays_each_direction(proxy: FaultProxy) -> None:
    with connect(proxy) as c:
        roundtrip(c, b"warm")  # the upstream connection is made before slowing down
        proxy.slow(200)
        t0 = time.monotonic()
        c.sendall(b"a")
        c.sendall(b"b")
        assert recv_exactly(c, 2) == b"ab"
        elapsed = time.monotonic() - t0
    assert 0.4 <= elapsed < 0.8


def test_pass_releases_chunks_held_by_slow_at_once(proxy: FaultProxy) -> None:
    with connect(proxy) as c:
        roundtrip(c, b"warm")
        proxy.slow(5000)
        t0 = time.monotonic()
        c.sendall(b"held")
        time.sleep(0.05)
        proxy.pass_()
        assert recv_exactly(c, 4) == b"held"
        assert roundtrip(c, b"new") == b"new"
        assert time.monotonic() - t0 < 1.0


def test_hang_holds_everything_until_pass(proxy: FaultProxy, echo: EchoServer) -> None:
    with connect(proxy) as before:
        roundtrip(before, b"warm")
        proxy.hang()
        before.sendall(b"one")
        before.sendall(b"two")
        with connect(proxy) as during:  # accepted, but not connected upstream yet
            during.sendall(b"three")
            before.settimeout(0.3)
            with pytest.raises(TimeoutError):
                before.recv(10)
            assert echo.accepted == 1
            assert proxy.connections() == 2

            proxy.pass_()
            before.settimeout(TIMEOUT_S)
            assert recv_exactly(before, 6) == b"onetwo"
            assert recv_exactly(during, 5) == b"three"
            assert echo.accepted == 2


def test_hang_holds_a_large_transfer_intact(proxy: FaultProxy) -> None:
    payload = bytes(range(256)) * (3 * 4096)  # 3 MiB: more than the proxy holds before pushing back
    with connect(proxy) as c:
        proxy.hang()
        sender = threading.Thread(target=c.sendall, args=(payload,), daemon=True)
        sender.start()
        time.sleep(0.1)
        proxy.pass_()
        assert recv_exactly(c, len(payload)) == payload
        sender.join(TIMEOUT_S)
        assert not sender.is_alive()


def test_refuse_resets_connections_and_refuses_new_ones_until_pass(proxy: FaultProxy, echo: EchoServer) -> None:
    with connect(proxy) as c:
        roundtrip(c, b"warm")
        proxy.refuse()
        with pytest.raises(ConnectionResetError):
            c.recv(10)
    with pytest.raises(ConnectionRefusedError):
        connect(proxy).close()
    assert eventually(lambda: echo.endings == ["ConnectionResetError"])
    assert proxy.connections() == 0

    proxy.pass_()
    with connect(proxy) as c:
        assert roundtrip(c, b"back") == b"back"


def test_reset_drops_open_connections_but_serves_new_ones(proxy: FaultProxy, echo: EchoServer) -> None:
    with connect(proxy) as old:
        roundtrip(old, b"warm")
        proxy.reset()
        with pytest.raises(ConnectionResetError):
            old.recv(10)
        with connect(proxy) as new:
            assert roundtrip(new, b"fresh") == b"fresh"
    assert proxy.mode == "pass"
    assert eventually(lambda: "ConnectionResetError" in echo.endings)


def test_connections_counts_open_client_connections(proxy: FaultProxy) -> None:
    assert proxy.connections() == 0
    a, b = connect(proxy), connect(proxy)
    with a, b:
        assert eventually(lambda: proxy.connections() == 2)
        a.close()
        assert eventually(lambda: proxy.connections() == 1)
    assert eventually(lambda: proxy.connections() == 0)


def test_a_client_is_closed_when_nothing_listens_upstream() -> None:
    with FaultProxy(free_port()) as p:
        with connect(p) as c:
            assert c.recv(10) == b""
        assert eventually(lambda: p.connections() == 0)
    assert p.errors == []


def test_close_with_held_connections_is_prompt(echo: EchoServer) -> None:
    p = FaultProxy(echo.port)
    p.start()
    name = f"faultproxy:{p.port}"
    with connect(p) as a, connect(p) as b:
        roundtrip(a, b"warm")
        p.hang()
        a.sendall(b"held")
        b.sendall(b"held too")
        assert eventually(lambda: p.connections() == 2)
        t0 = time.monotonic()
        p.close()
        assert time.monotonic() - t0 < 1.0
        for c in (a, b):
            with pytest.raises(ConnectionResetError):
                c.recv(10)
    assert not any(t.name == name for t in threading.enumerate())
    assert p.errors == []
    p.close()  # idempotent
    with pytest.raises(RuntimeError):
        p.pass_()


async def test_works_from_and_despite_the_callers_event_loop(proxy: FaultProxy) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        proxy.hang()  # a switch called on a running loop returns once applied, without needing that loop
        writer.write(b"ping")
        await writer.drain()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.readexactly(4), 0.2)
        proxy.pass_()
        assert await asyncio.wait_for(reader.readexactly(4), TIMEOUT_S) == b"ping"
        # A blocking round trip blocks this loop throughout: the proxy forwards on its own.
        with connect(proxy) as c:
            assert roundtrip(c, b"blocking") == b"blocking"
    finally:
        writer.close()
        await writer.wait_closed()
