"""Optional OpenTelemetry tracing (`tracing.enabled`): one server span per request, sent over OTLP/HTTP.

The management API, the page and the health endpoints are traced by the OpenTelemetry project's own
aiohttp-server middleware; a proxy's verify call (answered before the app's middlewares, see `_server`)
gets its span from `ForwardAuth`, named `auth <endpoint>`, as a child of the proxy's `traceparent` when
it sends one. Spans carry method, route and status, never a credential: no request headers are recorded
(the instrumentation records none unless told to by its environment variables).

The packages are the `tracing` extra (`pip install 'gateway[tracing]'`); they are imported only when
tracing is on, so a gateway without them starts as before.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from gateway.config import TracingConfig

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider


class Tracing:
    """The process's tracer provider and what the app needs of it."""

    def __init__(self, cfg: TracingConfig) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        from gateway import __version__

        resource = Resource.create({"service.name": cfg.service_name, "service.version": __version__})
        self.provider: TracerProvider = TracerProvider(
            resource=resource, sampler=ParentBased(TraceIdRatioBased(cfg.sample_ratio))
        )
        # Exported from a thread in batches: a collector that is down costs the requests nothing.
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=cfg.endpoint, timeout=5)))
        self.tracer = self.provider.get_tracer("gateway", __version__)

    def middleware(self) -> Middleware:
        from opentelemetry.instrumentation.aiohttp_server import AioHttpServerInstrumentor, create_aiohttp_middleware

        # `instrument()` readies the module (its tracer, metrics and URL exclusions) and also swaps
        # aiohttp's Application class for one adding the middleware to every app, sub-apps included (a
        # /v1/ call would be traced twice): the swap is undone at once, and the middleware put on this
        # app alone.
        instrumentor = AioHttpServerInstrumentor()
        if not instrumentor.is_instrumented_by_opentelemetry:
            with warnings.catch_warnings():  # aiohttp discourages the subclass that is undone just below
                warnings.simplefilter("ignore", DeprecationWarning)
                instrumentor.instrument(tracer_provider=self.provider)
            instrumentor.uninstrument()
        made: Middleware = create_aiohttp_middleware(self.provider)
        return made

    def verify_span(self, endpoint: str, headers: Mapping[str, str]) -> AbstractContextManager[Any]:
        """The span of one proxy's verify call, continuing the proxy's trace when it sent one."""
        from opentelemetry.propagate import extract
        from opentelemetry.trace import SpanKind

        return self.tracer.start_as_current_span(
            f"auth {endpoint}",
            context=extract(headers),
            kind=SpanKind.SERVER,
            attributes={"gateway.endpoint": endpoint},
        )

    async def ctx(self, _app: web.Application) -> AsyncIterator[None]:
        """Flush what is still batched when the app stops."""
        yield
        await asyncio.to_thread(self.provider.shutdown)  # waits for the exporter: off the event loop


TRACING = web.AppKey[Tracing | None]("tracing")


def make_tracing(cfg: TracingConfig) -> Tracing | None:
    return Tracing(cfg) if cfg.enabled else None
