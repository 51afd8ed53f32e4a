"""Forward-auth answers written as one block of bytes.

A proxy's answer is a status and a dozen short headers, most of them known before the request arrives
(a key's identity headers are made once per cache fill, a denial's once per code). `web.Response` would
build a header multidict for each answer and its `prepare` would work out framing, keep-alive, Date and
Server, run the response signals and serialize it all: together more than the decision itself costs.
`Answer` is a `web.StreamResponse` whose `prepare` writes the ready block in one write instead, with
what must be per request (Content-Length, Date, Connection, the status line's HTTP version) added the
way aiohttp adds them. A HEAD request gets the headers without the body. It runs no response signals:
`ForwardAuth.handle` does what the app's `on_response_prepare` would (closing while draining).
"""

from __future__ import annotations

from collections.abc import Iterable
from http import HTTPStatus

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.helpers import rfc822_formatted_time

_FORBIDDEN = frozenset("\r\n\x00")


def header_block(headers: Iterable[tuple[str, str]]) -> bytes:
    """`Name: value\\r\\n` lines. A CR, LF or NUL anywhere would split or end the head (header
    injection): refused with ValueError, as aiohttp refuses them."""
    lines = []
    for name, value in headers:
        if _FORBIDDEN.intersection(name) or _FORBIDDEN.intersection(value) or ":" in name:
            raise ValueError(f"header {name!r} cannot be sent")
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines).encode()


def _status_line(version: tuple[int, int], status: int) -> bytes:
    return f"HTTP/{version[0]}.{version[1]} {status} {HTTPStatus(status).phrase}\r\n".encode()


_STATUS_LINES = {(v, s): _status_line(v, s) for v in ((1, 0), (1, 1)) for s in (200, 401, 403, 429, 503)}


class Answer(web.StreamResponse):
    """An answer whose head (status aside) is `head`, pre-formatted, and whose body is `body`."""

    def __init__(self, status: int, head: bytes, body: bytes = b"") -> None:
        super().__init__(status=status)
        self._head = head
        self._payload = body

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self._eof_sent:
            return None
        keep_alive = request.keep_alive if self._keep_alive is None else self._keep_alive
        self._keep_alive = keep_alive
        version = (request.version.major, request.version.minor)
        status_line = _STATUS_LINES.get((version, self.status)) or _status_line(version, self.status)
        if keep_alive:
            connection = b"Connection: keep-alive\r\n" if version == (1, 0) else b""
        else:
            connection = b"Connection: close\r\n" if version >= (1, 1) else b""
        extra = header_block(self.headers.items()) if self.headers else b""  # set after construction
        body = b"" if request.method == "HEAD" else self._payload
        block = b"".join(
            (
                status_line,
                self._head,
                extra,
                b"Content-Length: %d\r\n" % len(self._payload),
                b"Date: %s\r\n" % rfc822_formatted_time().encode(),
                connection,
                b"\r\n",
                body,
            )
        )
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        transport.write(block)
        self._eof_sent = True
        self._body_length = len(body)
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        """Everything was written by `prepare`."""
