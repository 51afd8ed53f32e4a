"""The HTTP server under `gateway serve`: aiohttp's, except for requests its parser refuses.

aiohttp answers a request it cannot parse (a bare CR or a NUL in a header, an obs-fold line, a space
before the colon, a line over 8 KiB, a bad request line) outside the application, so no middleware sees
it: it logs an ERROR with a traceback and answers `400` with the parser's message as the body, and that
message quotes the offending bytes, typically the whole `Authorization` line, key included. It offers no
hook for this (aio-libs/aiohttp#3287, #9882), so the runner here builds its connections from a subclass
of `web.RequestHandler` whose `handle_error` answers those requests with the gateway's own fixed JSON
error (a 401 when the request was a proxy's call to `/auth/...`, as every denial to a proxy) and logs
one line naming the error class, with no request bytes and no traceback. Every other error is left to
aiohttp as before.

aiohttp also has no limit on how long a request's head may take to arrive: a client sending a byte every
few seconds holds the connection until the keep-alive timeout (75 s), and a slow drip resets nothing. The
same protocol starts a timer at the first byte of each request head and closes the connection when the
head is not complete within `server.header_timeout_s` (nginx's `client_header_timeout`, Go's
`ReadHeaderTimeout`). Bodies are bounded where they are read (`gateway._body.read_raw`).

A proxy's call to `/auth/<proxy>` goes straight from the server to `ForwardAuth.handle`, which answers every
outcome itself: the app's router, middlewares and response signals cost a decision about a fifth of its
time and add nothing to it (aiohttp's low-level server path). Every other request, and an `/auth/` target
spelt unusually (`/auth/%6Eginx`), is routed by the app as usual, to the same handler.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader

from gateway._answer import error_response
from gateway.errors import InvalidRequest
from gateway.forward import ForwardAuth
from gateway.typedefs import FORWARD

log = logging.getLogger("gateway.server")

MALFORMED = "malformed HTTP request"

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class _RequestHandler(web.RequestHandler):
    """One connection's protocol; only the answer to a request the parser refused differs."""

    __slots__ = ("_body", "_head_start", "_head_timeout_s", "_head_timer", "_refused")

    def __init__(self, manager: web.Server, *, head_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._head_timeout_s = head_timeout_s
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_start = b""
        self._body: StreamReader | None = None  # the last request's body: bytes go there until its end
        self._refused = False  # the parser refused a head: what follows is its rest, not a new one

    def _between_requests(self) -> bool:
        """No request being handled, none parsed and waiting, and the last one's body all read: the
        next bytes begin a head (not a body aiohttp is still draining after its answer)."""
        return (
            not self._request_in_progress
            and not self._messages
            and (self._body is None or self._body.is_eof())
            and not self._force_close
        )

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # aiohttp ignores bytes after a refused head too; it answers and closes
        # (aiohttp feeds itself b"" when it resumes reading after a pause: that begins nothing.)
        begins = bool(data) and self._head_timer is None and self._between_requests()
        if begins:
            self._head_start = data  # to tell a proxy's call, should the parser refuse it (no copy)
        super().data_received(data)
        if self._messages:  # a whole head arrived, or the parser refused one
            self._stop_head_timer()
            message, body = self._messages[-1]
            if isinstance(message, RawRequestMessage):
                self._body = body
                return
            self._refused = True
            exc = getattr(message, "exc", None)
            if self._body is not None and not self._body.is_eof() and isinstance(exc, HttpProcessingError):
                # The parser refused the body being read (bad chunking): its reader gets the error (400)
                # instead of waiting for bytes that will never count (408).
                self._body.set_exception(exc)
        elif begins and not self._force_close:
            # These bytes began a head: it must end in time. (A head that begins in the chunk ending the
            # previous body, or behind a whole request, is bounded by the keep-alive timeout instead.)
            self._head_timer = self._loop.call_later(self._head_timeout_s, self._head_too_slow)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self._between_requests():  # still no whole head
            log.info("request head not received within %.0f s: connection closed", self._head_timeout_s)
            self.force_close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        # The exception's message and arguments quote the request: only its class is named. A bad method
        # is mostly TLS or other non-HTTP traffic on the port (aiohttp itself logs it at DEBUG).
        level = logging.INFO if isinstance(exc, BadHttpMethod) else logging.WARNING
        log.log(level, "%s refused (%s) from %s", MALFORMED, type(exc).__name__, request.remote)
        if request.writer.output_size > 0:  # an answer already started: the connection is closed instead
            raise ConnectionError("cannot answer a malformed request after a response started")
        # A proxy's call (/auth/...) gets the 401 proxies understand: nginx's auth_request would log a 400
        # as an error, with the client's request line and query, and answer 500.
        to_proxy = self._head_start.partition(b" ")[2].startswith(b"/auth/")
        response = error_response(InvalidRequest(MALFORMED), to_proxy=to_proxy)
        response.force_close()
        return response


class _Server(web.Server):
    head_timeout_s: float

    def __call__(self) -> web.RequestHandler:
        return _RequestHandler(self, loop=self._loop, head_timeout_s=self.head_timeout_s, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """`web.AppRunner` whose connections answer malformed requests as `_RequestHandler` does, and close
    when a request head takes longer than `head_timeout_s`."""

    def __init__(self, app: web.Application, *, head_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._head_timeout_s = head_timeout_s

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # aiohttp's application builds a plain `web.Server`; ours differs only in the protocol its
        # connections get, so it takes the built server as it is (every attribute set by aiohttp).
        server.__class__ = _Server
        assert isinstance(server, _Server)
        server.head_timeout_s = self._head_timeout_s
        server.request_handler = _dispatcher(self.app[FORWARD], server.request_handler)
        return server


def _dispatcher(forward: ForwardAuth, routed: Handler) -> Handler:
    """`/auth/<proxy>` to its handler at once; anything else to the app (router, middlewares, signals)."""

    async def dispatch(request: web.BaseRequest) -> web.StreamResponse:
        endpoint = forward.endpoint(request.raw_path)
        if endpoint is None:
            return await routed(request)
        return await forward.handle(request, endpoint)

    return dispatch
