"""OpenTelemetry tracing, switched on by config: spans reach a real OTLP/HTTP receiver."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from gateway.app import create_app
from gateway.config import config_from_mapping
from gateway.errors import ConfigError
from gateway.tracing import TRACING
from tests.conftest import Services, World, make_config, nginx_headers

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


async def test_spans_of_verify_calls_and_the_api_reach_the_collector(
    aiohttp_client: Any, aiohttp_server: Any, services: Services, world: World
) -> None:
    received: list[bytes] = []

    async def traces(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.Response(content_type="application/x-protobuf", body=b"")

    collector = web.Application()
    collector.router.add_post("/v1/traces", traces)
    server = await aiohttp_server(collector)
    cfg = make_config(services, tracing={"enabled": True, "endpoint": f"http://127.0.0.1:{server.port}/v1/traces"})
    app = create_app(cfg)
    client = await aiohttp_client(app)
    k = await world.key(orgs=[world.org_a])
    parent = {"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"}  # the proxy's trace
    assert (await client.get("/auth/nginx", headers={**nginx_headers(k["key"]), **parent})).status == 200
    assert (await client.get("/v1/me", headers={"Authorization": f"Bearer {k['key']}"})).status == 200
    tracing = app[TRACING]
    assert tracing is not None
    assert await asyncio.to_thread(tracing.provider.force_flush)
    spans = [
        span
        for body in received
        for resource in ExportTraceServiceRequest.FromString(body).resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]
    by_name = {span.name: span for span in spans}
    verify = by_name["auth nginx"]
    assert verify.trace_id.hex() == TRACE_ID  # a child of the proxy's span
    assert {a.key: a.value for a in verify.attributes}["http.response.status_code"].int_value == 200
    assert any(span.name.startswith("GET") and span.trace_id.hex() != TRACE_ID for span in spans), list(by_name)
    assert all(k["key"].encode() not in body and k["key"][-20:].encode() not in body for body in received)


def test_tracing_is_off_by_default_and_its_settings_are_checked() -> None:
    base = {"database": {"url": "postgresql://x"}, "redis": {"url": "redis://x"}, "pepper": "p" * 32}
    assert config_from_mapping(base, env={}).tracing.enabled is False
    for tracing, field in (
        ({"sample_ratio": 1.5}, "tracing.sample_ratio"),
        ({"endpoint": "collector:4318"}, "tracing.endpoint"),
    ):
        with pytest.raises(ConfigError, match=field):
            config_from_mapping({**base, "tracing": tracing}, env={})
