"""What a verified credential is, as every layer sees it: the key's record (read from Postgres, cached in
both tiers) and its identity in one org. A leaf: imports nothing of the gateway but its constants."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from gateway import constants as C

IP = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """What verification needs to know of a key, without its hash."""

    id: str
    user_id: str
    name: str
    role: str
    env: str
    scopes: tuple[str, ...] | None
    all_orgs: bool
    org_ids: tuple[str, ...]
    all_projects: bool
    project_ids: tuple[str, ...]
    allowed_cidrs: tuple[str, ...] | None
    rate_limit: str | None
    expires_at: float | None
    revoked_at: float | None
    memberships: dict[str, str] = field(hash=False)  # owner's org id -> role, read with the key
    hash_fingerprint: str = ""  # identifies the argon2 hash the digest was verified against
    # How the request authenticated: `api_key`, or `session` / `jwt`, whose records are made per request
    # from the session or token and the user's current memberships (see Verifier). Theirs has an empty id
    # unless a key caps them.
    method: str = "api_key"
    # Compiled once per cache fill, not per request: the allowlist's networks, and the key's identity in
    # each (org, project) it has acted in (role, permissions, ready headers; see `authz.authorize`).
    _networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None = field(
        init=False, compare=False, hash=False, repr=False
    )
    _identities: dict[tuple[str, str | None], Identity] = field(init=False, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        networks = None
        if self.allowed_cidrs is not None:
            networks = tuple(ipaddress.ip_network(c, strict=False) for c in self.allowed_cidrs)
        object.__setattr__(self, "_networks", networks)
        object.__setattr__(self, "_identities", {})

    def networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None:
        return self._networks

    def identity(self, org: str, project: str | None) -> Identity | None:
        """The key's memoised identity in (org, project); None: not computed yet."""
        return self._identities.get((org, project))

    def remember_identity(self, org: str, project: str | None, identity: Identity) -> None:
        if len(self._identities) < C.IDENTITIES_PER_KEY:  # bounded, whatever projects a key is asked for
            self._identities[(org, project)] = identity

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "user_id": self.user_id,
            "name": self.name,
            "role": self.role,
            "env": self.env,
            "scopes": list(self.scopes) if self.scopes is not None else None,
            "all_orgs": self.all_orgs,
            "org_ids": list(self.org_ids),
            "all_projects": self.all_projects,
            "project_ids": list(self.project_ids),
            "allowed_cidrs": list(self.allowed_cidrs) if self.allowed_cidrs is not None else None,
            "rate_limit": self.rate_limit,
            "expires_at": self.expires_at,
            "revoked_at": self.revoked_at,
            "memberships": self.memberships,
            "hash_fingerprint": self.hash_fingerprint,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> KeyRecord:
        return cls(
            id=d["id"],
            user_id=d["user_id"],
            name=d["name"],
            role=d["role"],
            env=d["env"],
            scopes=tuple(d["scopes"]) if d["scopes"] is not None else None,
            all_orgs=d["all_orgs"],
            org_ids=tuple(d["org_ids"]),
            all_projects=d["all_projects"],
            project_ids=tuple(d["project_ids"]),
            allowed_cidrs=tuple(d["allowed_cidrs"]) if d["allowed_cidrs"] is not None else None,
            rate_limit=d["rate_limit"],
            expires_at=d["expires_at"],
            revoked_at=d["revoked_at"],
            memberships=dict(d["memberships"]),
            hash_fingerprint=d["hash_fingerprint"],
        )


# What a proxy is answered with, in this order, for every credential (empty values for anonymous calls).
IDENTITY_HEADERS = ("X-Org", "X-Role", "X-User", "X-Key-Id", "X-Scopes", "X-Project", "X-Key-Env", "X-Auth-Method")


@dataclass(frozen=True, slots=True)  # made once per (key, org, project) and cache fill; shared by requests
class Identity:
    key_id: str
    user_id: str
    org: str
    role: str
    scopes: tuple[str, ...]
    env: str
    project: str | None
    expires_at: float | None
    rate_limit: str | None
    head: bytes  # the IDENTITY_HEADERS a proxy is answered with, ready to send
