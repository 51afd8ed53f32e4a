"""`POST /v1/keys/verify`: verification for services that check a key in-process, by the same Verifier,
route policy and client-address rules as the proxy endpoints (`gateway.forward`), answered as a JSON verdict."""

from __future__ import annotations

import dataclasses

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from gateway._body import json_object, read_raw
from gateway._paths import canonical
from gateway.errors import GatewayError, RouteNotAllowed
from gateway.formats import iso
from gateway.forward import ForwardAuth, uri_parts, valid_method
from gateway.policy import ORG_HEADER, OriginalRequest, RouteDecision, checked_id
from gateway.schemas import VerifyRequest, read
from gateway.typedefs import FORWARD


async def keys_verify(request: web.Request) -> web.Response:
    """`POST /v1/keys/verify`, in-process verification for services: 200 with the verdict in the body
    (400 for a malformed body, 503 for an outage). Checked and charged by the proxies' Verifier."""
    forward = request.app[FORWARD]
    body = read(VerifyRequest, json_object(await read_raw(request, forward.body_timeout_s)))
    decision = _verify_route(forward, body)
    result: dict[str, object] = {
        "valid": False,
        "code": "",
        "key_id": None,
        "org": None,
        "role": None,
        "scopes": [],
        "env": None,
        "expires_at": None,
        "ratelimit": None,
    }
    verifier = forward.verifier
    try:
        if decision.auth == "deny":
            raise RouteNotAllowed("no rule allows this route")
        parsed = verifier.parse(body["key"])
        result["key_id"] = parsed.key_id
        # The key's own client is not known here: an allowlisted key is refused (client None). Failures
        # count against the calling service's address, never against a budget shared by every caller.
        caller = forward.clients.of(request.remote, request.headers)[0]
        record = await verifier.authenticate(parsed, caller)
        identity = await verifier.authorize(record, decision, None, body.get("permission"))
        ratelimit = await verifier.charge(identity, identity.org)
    except GatewayError as err:
        if err.status == 503:
            raise
        result["code"] = err.code.upper()
        return web.json_response(result)
    result.update(
        valid=True,
        code="VALID",
        org=identity.org,
        role=identity.role,
        scopes=list(identity.scopes),
        env=identity.env,
        expires_at=iso(identity.expires_at),
        ratelimit=None
        if ratelimit is None
        else {"limit": ratelimit.limit.burst, "remaining": ratelimit.remaining, "reset": ratelimit.reset_s},
    )
    return web.json_response(result)


def _verify_route(forward: ForwardAuth, body: dict[str, str]) -> RouteDecision:
    """With `path` (and `method`), the route policy decides as it would for a proxy."""
    org = checked_id(body["org"], "org") if "org" in body else None
    if "path" not in body:
        return RouteDecision(org=org)
    path, query = uri_parts(body["path"])
    original = OriginalRequest(valid_method(body.get("method", "GET")), "", canonical(path), query)
    headers = CIMultiDictProxy(CIMultiDict({ORG_HEADER: org} if org else {}))
    decision = forward.policy.decide(original, headers)
    return dataclasses.replace(decision, org=decision.org or org)
