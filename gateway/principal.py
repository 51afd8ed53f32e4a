"""Who a `/v1/` call acts as: its credential's record (a key's, or a session's or token's, see
gateway.verifier) and what it may do in each org."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from gateway.audit import Actor
from gateway.authz import effective_permissions, granted, role_in
from gateway.config import RolesConfig
from gateway.errors import InsufficientPermissions, NotFound
from gateway.models import KeyRecord


@dataclass(frozen=True)
class Principal:
    record: KeyRecord
    actor: Actor
    roles: RolesConfig
    stopped: tuple[str, ...] = ()  # orgs whose admins stopped this credential there

    @property
    def user_id(self) -> str:
        return self.record.user_id

    def role_in(self, org: str) -> str | None:
        return role_in(self.record, org, self.roles)

    def permissions_in(self, org: str) -> tuple[str, ...]:
        """What this credential may do in `org`: its role there (capped by its owner's) met with its scopes,
        exactly as forward auth computes X-Scopes."""
        role = self.role_in(org)
        if role is None:
            return ()
        return effective_permissions(self.roles.permissions.get(role, ()), self.record.scopes)

    def may(self, org: str, permission: str) -> bool:
        """Whether this credential administers `org` (`roles.admin` or above) with `permission`."""
        role = self.role_in(org)
        return role is not None and granted(self.permissions_in(org), permission) and self.roles.administers(role)

    def require(self, org: str, permission: str | None = None, *, admin: bool = False) -> str:
        """The effective role in `org`, which must grant `permission` (and with `admin`, reach
        `roles.admin`): an org the credential cannot act in is 404, too little power 403."""
        role = self.role_in(org)
        if role is None:
            raise NotFound(f"no org {org}")
        if permission is not None and not granted(self.permissions_in(org), permission):
            raise InsufficientPermissions(f"requires {permission} in this org")
        if admin and not self.roles.administers(role):
            raise InsufficientPermissions(f"requires role {self.roles.admin} in this org")
        return role

    def require_own(self, permission: str) -> None:
        """An action on no org (creating one): the credential's own role and scopes must grant it."""
        own = self.roles.permissions.get(self.record.role, ())
        if not granted(effective_permissions(own, self.record.scopes), permission):
            raise InsufficientPermissions(f"requires {permission}")

    def orgs(self) -> list[str]:
        return sorted(org for org in self.record.memberships if self.role_in(org) is not None)


PRINCIPAL = web.RequestKey("principal", Principal)
