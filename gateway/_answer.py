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

import functools
import json
import logging
import uuid
from collections.abc import Iterable
from http import HTTPStatus

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.helpers import rfc822_formatted_time

from gateway.errors import GatewayError, InternalError
from gateway.keys import redact
from gateway.logs import NO_REQUEST, REQUEST_ID

log = logging.getLogger("gateway.answer")

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
        self.request_id = b""  # the `X-Request-Id: ...` line of this request's answer

    def with_request_id(self, rid: str) -> Answer:
        """Says the request's id (checked or made by `RequestIds`: a header value as it is)."""
        self.request_id = b"X-Request-Id: %s\r\n" % rid.encode()
        return self

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
                self.request_id,
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


# --- the contract's JSON denial, to a proxy and to everyone else ----------------------------------

JSON = "application/json"


@functools.lru_cache(maxsize=1024)
def _denial(code: str, message: str, field: str | None) -> bytes:
    """The JSON body of a denial: the same few for every junk key, so made once each (a bounded memo)."""
    # A message may quote the caller's input (a field name, an id): nothing key-shaped is echoed back.
    body: dict[str, str] = {"code": code, "message": redact(message)}
    if field is not None:
        body["field"] = redact(field)
    return json.dumps({"error": body}).encode()


def error_response(err: GatewayError, *, to_proxy: bool = False) -> web.Response:
    """The contract's JSON denial. To a proxy a 400 is a 401: nginx's auth_request and Traefik only
    deny on 401/403, and would turn a 400 into a 500 or pass it through as if it were the upstream's."""
    status = 401 if to_proxy and err.status == 400 else err.status
    base = _denial_headers(err.code, status)
    headers = {**err.headers, **base} if err.headers else base
    response = web.Response(body=_denial(err.code, err.message, err.field), status=status, headers=headers)
    if err.headers.get("Connection") == "close":
        response.force_close()
    return response


@functools.lru_cache(maxsize=256)
def _denial_headers(code: str, status: int) -> dict[str, str]:
    """A denial's own headers (a memo: never modified; `web.Response` copies what it is given)."""
    headers = {"Content-Type": JSON, "X-Auth-Error": code, "Cache-Control": "no-store"}
    if status == 401:
        headers["WWW-Authenticate"] = f'Bearer error="{code}"'
    return headers


def unexpected(request: web.BaseRequest) -> InternalError:
    """The error of a bug, logged with its traceback under the request id it is answered with."""
    rid = REQUEST_ID.get()
    if rid == NO_REQUEST:  # not begun as a request (a refusal by the HTTP parser, say)
        rid = uuid.uuid4().hex
    log.exception("unexpected error (request id %s) on %s %s", rid, request.method, redact(request.path))
    return InternalError(rid)


def denial(err: GatewayError) -> Answer:
    """`error_response(err, to_proxy=True)` as a ready-made `Answer` (see `gateway._answer`)."""
    status = 401 if err.status == 400 else err.status
    head, body = _denial_block(err.code, err.message, err.field, status)
    if not err.headers:
        return Answer(status, head, body)
    extra = {k: v for k, v in err.headers.items() if k.lower() != "connection"}
    answer = Answer(status, header_block(extra.items()) + head, body)
    if err.headers.get("Connection") == "close":
        answer.force_close()
    return answer


@functools.lru_cache(maxsize=1024)
def _denial_block(code: str, message: str, field: str | None, status: int) -> tuple[bytes, bytes]:
    return header_block(_denial_headers(code, status).items()), _denial(code, message, field)
