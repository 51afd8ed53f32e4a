"""A real upstream framework for tests/test_deploy_paths.py: Starlette under uvicorn (h11), with routes that
mirror the shipped policy (config/policy.yaml), in the same order.

Every request is recorded under its `X-Test-Id`, with the route Starlette chose (`strict`), the route the
same patterns choose when matched case-insensitively like Express or ASP.NET (`folded`), their parameters,
and the identity headers the gateway set. `GET /__seen/<id>`, asked directly, returns the record or 404:
so a test knows whether the upstream received a request at all, not only what the proxy answered.

Run: `python -m uvicorn tests._upstream:app --http h11`.
"""

from __future__ import annotations

import re
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route, Router
from starlette.types import Receive, Scope, Send

# (name, pattern) in the policy's order; `{rest:path}` is the policy's `**`.
PATTERNS = [
    ("home", "/"),
    ("docs", "/docs"),
    ("docs", "/docs/{rest:path}"),
    ("project", "/v1/orgs/{org}/projects/{project}"),
    ("project", "/v1/orgs/{org}/projects/{project}/{rest:path}"),
    ("org", "/v1/orgs/{org}"),
    ("org", "/v1/orgs/{org}/{rest:path}"),
    ("api", "/v1"),
    ("api", "/v1/{rest:path}"),
]
IDENTITY = ("x-org", "x-project", "x-auth-method", "x-role", "x-key-id")
SEEN: dict[str, dict[str, Any]] = {}


def _folded() -> list[Route]:
    routes = []
    for name, pattern in PATTERNS:
        route = Route(pattern, _noop, name=name)
        route.path_regex = re.compile(route.path_regex.pattern, re.IGNORECASE)
        routes.append(route)
    return routes


async def _noop(request: Request) -> Response:
    return Response(status_code=500)


FOLDED = _folded()


def _record(scope: Scope, strict: str | None, strict_params: dict[str, Any]) -> dict[str, Any]:
    folded: dict[str, Any] = {"route": None, "params": {}}
    for route in FOLDED:
        match, child = route.matches(scope)
        if match == Match.FULL:
            folded = {"route": route.name, "params": {k: str(v) for k, v in child["path_params"].items()}}
            break
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    record = {
        "strict": {"route": strict, "params": {k: str(v) for k, v in strict_params.items()}},
        "folded": folded,
        "raw_path": scope["raw_path"].decode("latin-1"),
        "path": scope["path"],
        "identity": {h: headers.get(h, "") for h in IDENTITY},
    }
    test_id = headers.get("x-test-id")
    if test_id:
        SEEN[test_id] = record
    return record


def _endpoint(name: str) -> Any:
    async def endpoint(request: Request) -> JSONResponse:
        return JSONResponse(_record(request.scope, name, dict(request.path_params)))

    return endpoint


async def seen(request: Request) -> JSONResponse:
    record = SEEN.get(request.path_params["test_id"])
    return JSONResponse(record, status_code=200 if record else 404)


async def no_route(scope: Scope, receive: Receive, send: Send) -> None:
    await JSONResponse(_record(scope, None, {}), status_code=404)(scope, receive, send)


# Slash redirects off: a redirect is not a route, and the test wants what the router matched.
app = Router(
    [Route("/__seen/{test_id}", seen), *(Route(p, _endpoint(n), name=n) for n, p in PATTERNS)],
    redirect_slashes=False,
    default=no_route,
)
