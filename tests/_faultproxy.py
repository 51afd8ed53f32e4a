"""A TCP proxy that injects server faults for tests: slow, hung, crashed or restarted Postgres and Redis.

Fault-injection tests point the gateway at `FaultProxy(server_port).port` instead of the real server and
switch the proxy's mode, so the shared session servers are never stopped or signalled. The proxy runs its
own event loop on a daemon thread: it keeps forwarding while a test blocks its own loop, and every mode
switch can be called from any thread and has taken effect when it returns.

    with FaultProxy(services.pg.port) as proxy:
        dsn = f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres"
        proxy.hang()  # ... the gateway times out ...
        proxy.pass_()
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

T = TypeVar("T")
Mode = Literal["pass", "slow", "hang", "refuse"]

# Past this many held bytes in one direction the proxy stops reading from that side, so a client writing
# into a hung server is pushed back by TCP (as it would be by a stopped server) instead of filling memory.
_HIGH_WATER = 1 << 20
_LOW_WATER = 1 << 18
_CALL_TIMEOUT_S = 5.0
_LOST_TIMEOUT_S = 1.0
_JOIN_TIMEOUT_S = 2.0
# SO_LINGER on with a zero timeout: close() sends RST, which is what a client sees when a server dies.
_LINGER_RST = struct.pack("ii", 1, 0)


class FaultProxy:
    """Forwards 127.0.0.1:`port` to `target_host`:`target_port`, with a switchable fault mode."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        # Unexpected errors (loop exception handler, a failing pipe), kept for tests to assert on, never printed.
        self.errors: list[str] = []
        self._mode: Mode = "pass"
        self._delay_s = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._pipes: set[_Pipe] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("FaultProxy already started")
        sock = _listening_socket(0)
        self.port = int(sock.getsockname()[1])
        # Always the stdlib selector loop: the tests may have installed uvloop, whose transports differ.
        loop = asyncio.SelectorEventLoop()
        loop.set_exception_handler(self._on_loop_error)
        self._loop = loop
        self._thread = threading.Thread(target=self._run_loop, name=f"faultproxy:{self.port}", daemon=True)
        self._thread.start()
        self._call(self._serve(sock))

    def close(self) -> None:
        """Abort every connection, stop listening and join the thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            if thread.is_alive():
                asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(_CALL_TIMEOUT_S)
        finally:
            if thread.is_alive():
                loop.call_soon_threadsafe(loop.stop)
                thread.join(_JOIN_TIMEOUT_S)

    def __enter__(self) -> Self:
        if self._thread is None:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- modes -------------------------------------------------------------------------------------------

    @property
    def mode(self) -> Mode:
        return self._mode

    def pass_(self) -> None:
        """Forward both ways; release everything held, in order; listen again after `refuse()`."""
        self._call(self._switch("pass"))

    def slow(self, ms: float) -> None:
        """Forward every chunk, in both directions, `ms` after it arrived."""
        if ms < 0:
            raise ValueError("ms must be >= 0")
        self._call(self._switch("slow", ms / 1000))

    def hang(self) -> None:
        """Accept connections but forward nothing, holding the bytes (a SIGSTOPped server)."""
        self._call(self._switch("hang"))

    def refuse(self) -> None:
        """Reset every connection and stop listening, so connecting is refused (a crashed server)."""
        self._call(self._switch("refuse"))

    def reset(self) -> None:
        """Reset every open connection once; the mode is unchanged, so new connections work as before."""
        self._call(self._abort_all())

    def connections(self) -> int:
        """Client connections currently open through the proxy."""
        return self._call(self._count())

    # -- loop side ---------------------------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop is None or self._closed:
            coro.close()
            raise RuntimeError("FaultProxy is not running")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("FaultProxy methods must not be called from its own thread")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(_CALL_TIMEOUT_S)

    def _run_loop(self) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop.close()

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.errors.append(f"{context.get('message')}: {context.get('exception')!r}")

    async def _serve(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(lambda: _Pipe(self, loop).client, sock=sock)
        except BaseException:
            sock.close()
            raise

    def _stop_listening(self) -> None:
        if self._server is not None:
            # Closes the listening socket at once: connect() now gets ECONNREFUSED, and connections still
            # in the accept backlog are reset by the kernel.
            self._server.close()
            self._server = None

    async def _switch(self, mode: Mode, delay_s: float = 0.0) -> None:
        if mode == "refuse":
            self._stop_listening()
        elif self._server is None:
            await self._serve(_listening_socket(self.port))
        self._mode, self._delay_s = mode, delay_s
        # Every waiting pump re-reads the mode; a fresh event serves the next switch.
        self._changed.set()
        self._changed = asyncio.Event()
        if mode == "refuse":
            await self._abort_all()

    async def _abort_all(self) -> None:
        pipes = list(self._pipes)
        for pipe in pipes:
            pipe.abort()
        # Return only once the sockets are closed, so the client sees the reset as soon as the call returns.
        waits: set[asyncio.Future[Any]] = {s.lost for p in pipes for s in p.sides() if s.transport is not None}
        waits.update(p.task for p in pipes if p.task is not None)
        if waits:
            await asyncio.wait(waits, timeout=_LOST_TIMEOUT_S)

    async def _shutdown(self) -> None:
        self._stop_listening()
        await self._abort_all()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=_LOST_TIMEOUT_S)

    async def _count(self) -> int:
        return sum(1 for p in self._pipes if p.client.transport is not None and not p.client.lost.done())

    def _start(self, pipe: _Pipe) -> None:
        assert self._loop is not None
        task = self._loop.create_task(pipe.run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        pipe.task = task

    def _held(self) -> bool:
        return self._mode in ("hang", "refuse")

    async def _until_running(self) -> None:
        while self._held():
            await self._changed.wait()

    async def _until_due(self, arrived: float) -> None:
        """Wait until a chunk that arrived at loop time `arrived` may be forwarded in the current mode."""
        loop = asyncio.get_running_loop()
        while self._mode != "pass":
            changed = self._changed
            timeout: float | None = None
            if self._mode == "slow":
                timeout = arrived + self._delay_s - loop.time()
                if timeout <= 0:
                    return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await changed.wait()


class _Direction:
    """Bytes travelling one way through a pipe, queued with their arrival time; `None` is the EOF."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.chunks: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.size = 0
        self.ready = asyncio.Event()
        self.writable = asyncio.Event()
        self.writable.set()
        self.src: _Side | None = None
        self.dst: _Side | None = None

    def feed(self, data: bytes | None) -> None:
        self.chunks.append((self.loop.time(), data))
        if data is not None:
            self.size += len(data)
            if self.size > _HIGH_WATER and self.src is not None and self.src.transport is not None:
                self.src.transport.pause_reading()
        self.ready.set()


class _Side(asyncio.Protocol):
    """One TCP connection of a pipe: the client's or the upstream's."""

    def __init__(self, pipe: _Pipe, inbound: _Direction, outbound: _Direction) -> None:
        self.pipe = pipe
        self.inbound = inbound
        self.outbound = outbound
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = pipe.loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.inbound.src = self
        self.outbound.dst = self
        self.pipe.made(self)

    def data_received(self, data: bytes) -> None:
        self.inbound.feed(data)

    def eof_received(self) -> bool:
        self.inbound.feed(None)
        return True  # stay half-open: the EOF is forwarded in order, after the bytes queued before it

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        self.pipe.lost(exc)

    def pause_writing(self) -> None:
        self.outbound.writable.clear()

    def resume_writing(self) -> None:
        self.outbound.writable.set()

    def is_open(self) -> bool:
        return self.transport is not None and not self.lost.done()

    def abort(self) -> None:
        if self.transport is None or self.lost.done():
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        self.transport.abort()


class _Pipe:
    """A client connection and its upstream connection."""

    def __init__(self, proxy: FaultProxy, loop: asyncio.AbstractEventLoop) -> None:
        self.proxy = proxy
        self.loop = loop
        self.up = _Direction(loop)
        self.down = _Direction(loop)
        self.client = _Side(self, self.up, self.down)
        self.upstream: _Side | None = None
        self.task: asyncio.Task[None] | None = None
        self.dead = False
        self.eofs = 0

    def sides(self) -> list[_Side]:
        return [self.client] if self.upstream is None else [self.client, self.upstream]

    def made(self, side: _Side) -> None:
        if side is self.client:
            self.proxy._pipes.add(self)
            self.proxy._start(self)
            return
        self.upstream = side
        if self.dead:
            side.abort()

    def lost(self, exc: Exception | None) -> None:
        # A reset on one side resets the other; an orderly close on one side closes the other.
        if exc is not None:
            self.abort()
        else:
            self.close()
        if not any(s.is_open() for s in self.sides()):
            self.proxy._pipes.discard(self)

    def abort(self) -> None:
        self.dead = True
        for side in self.sides():
            side.abort()
        self._stop_task()

    def close(self) -> None:
        self.dead = True
        for side in self.sides():
            if side.is_open() and side.transport is not None:
                side.transport.close()
        self._stop_task()

    def _stop_task(self) -> None:
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()

    async def run(self) -> None:
        try:
            # Connections accepted while hung reach the server only once it runs again.
            await self.proxy._until_running()
            try:
                await self.loop.create_connection(
                    lambda: _Side(self, self.down, self.up), self.proxy.target_host, self.proxy.target_port
                )
            except OSError:
                self.close()  # no server behind the proxy: the client sees its connection closed
                return
            if self.dead:
                return
            # A task group, unlike gather, cancels the other direction if one fails.
            async with asyncio.TaskGroup() as group:
                group.create_task(self._pump(self.up))
                group.create_task(self._pump(self.down))
        except Exception as exc:
            self.proxy.errors.append(f"pipe: {exc!r}")
            self.abort()

    async def _pump(self, d: _Direction) -> None:
        while not self.dead:
            while not d.chunks:
                d.ready.clear()
                await d.ready.wait()
            arrived, data = d.chunks[0]
            await self.proxy._until_due(arrived)
            await d.writable.wait()
            if self.dead or d.dst is None or d.dst.transport is None or not d.dst.is_open():
                return
            d.chunks.popleft()
            dst = d.dst.transport
            if data is None:
                if dst.can_write_eof():
                    dst.write_eof()
                self.eofs += 1
                if self.eofs == 2:
                    self.close()
                return
            dst.write(data)
            d.size -= len(data)
            if d.size <= _LOW_WATER and d.src is not None and d.src.transport is not None:
                d.src.transport.resume_reading()


def _listening_socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # SO_REUSEADDR lets pass_() after refuse() listen on the same port despite TIME_WAIT connections.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
