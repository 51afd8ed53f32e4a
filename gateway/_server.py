"""The HTTP server under `gateway serve`: aiohttp's, except for requests its parser refuses.

aiohttp answers a request it cannot parse (a bare CR or a NUL in a header, an obs-fold line, a space
before the colon, a line over 8 KiB, a bad request line) outside the application, so no middleware sees
it: it logs an ERROR with a traceback and answers `400` with the parser's message as the body, and that
message quotes the offending bytes, typically the whole `Authorization` line, key included. It offers no
hook for this (aio-libs/aiohttp#3287, #9882), so the runner here builds its connections from a subclass
of `web.RequestHandler` whose `handle_error` answers those requests with the gateway's own fixed JSON
error and logs one line naming the error class, with no request bytes and no traceback. Every other
error is left to aiohttp as before.
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError

from gateway.errors import InvalidRequest
from gateway.forward import error_response

log = logging.getLogger("gateway.server")

MALFORMED = "malformed HTTP request"


class _RequestHandler(web.RequestHandler):
    """One connection's protocol; only the answer to a request the parser refused differs."""

    __slots__ = ()

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
        response = error_response(InvalidRequest(MALFORMED))
        response.force_close()
        return response


class _Server(web.Server):
    def __call__(self) -> web.RequestHandler:
        return _RequestHandler(self, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """`web.AppRunner` whose connections answer malformed requests as `_RequestHandler` does."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # aiohttp's application builds a plain `web.Server`; ours differs only in the protocol its
        # connections get, so it takes the built server as it is (every attribute set by aiohttp).
        server.__class__ = _Server
        return server
