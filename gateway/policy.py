"""What a route requires. The full YAML route policy plugs in here through the `Policy` protocol."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

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
    def decide(self, request: OriginalRequest, headers: Mapping[str, str]) -> RouteDecision: ...


def checked_id(value: str, what: str) -> str:
    if not _ID_RE.fullmatch(value):
        raise InvalidRequest(f"{what} is not a valid id")
    return value


class HeaderOrgPolicy:
    """Every route requires a valid key; the org comes from `X-Org-Id` when the request names one."""

    def decide(self, request: OriginalRequest, headers: Mapping[str, str]) -> RouteDecision:
        org = headers.get(ORG_HEADER)
        return RouteDecision(org=checked_id(org, ORG_HEADER) if org is not None else None)
