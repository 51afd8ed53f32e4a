"""What a route requires. The full YAML route policy plugs in here through the `Policy` protocol."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Protocol

from multidict import CIMultiDictProxy

from gateway.errors import InvalidRequest

ORG_HEADER = "X-Org-Id"
_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True, slots=True)
class OriginalRequest:
    """The client's request as the proxy describes it."""

    method: str
    host: str
    path: str
    query: str


@dataclass(frozen=True, slots=True)
class RouteDecision:
    auth: Literal["public", "required"] = "required"
    permission: str | None = None
    role: str | None = None
    org: str | None = None  # the org the route names, if any
    project: str | None = None


class Policy(Protocol):
    def decide(self, request: OriginalRequest, headers: CIMultiDictProxy[str]) -> RouteDecision: ...


def checked_id(value: str, what: str) -> str:
    if not _ID_RE.fullmatch(value):
        raise InvalidRequest(f"{what} is not a valid id")
    return value


class HeaderOrgPolicy:
    """Every route requires a valid key; the org comes from `X-Org-Id` when the request names one."""

    def decide(self, request: OriginalRequest, headers: CIMultiDictProxy[str]) -> RouteDecision:
        orgs = headers.getall(ORG_HEADER, [])
        if len(orgs) > 1:
            raise InvalidRequest(f"{ORG_HEADER} must be sent at most once")
        return RouteDecision(org=checked_id(orgs[0], ORG_HEADER) if orgs else None)
