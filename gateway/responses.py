"""The `/v1/` response bodies, defined once: `gateway.openapi` documents each 2xx answer with one of these
models (their JSON Schema), and the tests check real answers against that document (tests/test_openapi.py).

They describe what the handlers answer (`gateway.api`, `gateway.keys_verify`), which build plain dicts
(`keyring.key_view`, `directory`, `invitations`, `audit`): a field is required when every answer carries
it, nullable when its value can be null. Open (a client ignores fields it does not know), unlike the
request models of `gateway.schemas`, which refuse them."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

Env = Literal["live", "test"]
KeyStatus = Literal["active", "expired", "revoked"]
InvitationStatus = Literal["pending", "accepted", "declined", "revoked", "expired"]
RoleName = str  # one of the configured `roles.order` (shipped: viewer, member, admin, owner)


class Answer(BaseModel):
    """A response body. Timestamps are ISO 8601 in UTC (`2026-01-31T12:00:00.123456Z`)."""


# --- keys ----------------------------------------------------------------------------------------


class Key(Answer):
    """A key as the caller may see it: never its secret. Another member's key (seen by an org's admin) shows
    only the orgs and projects of the orgs the admin sees it from, and when it also acts elsewhere, its
    last use in those orgs only (to the minute), or none."""

    id: str = Field(description="The public key id (in the key itself, in X-Key-Id and in the audit)")
    name: str
    user_id: str = Field(description="Its owner: a user, or a service account of one org")
    role: RoleName
    env: Env
    start: str = Field(description="The key's first characters, to recognise it", examples=["gw_live_ab12"])
    scopes: list[str] | None = Field(description="Permission patterns; null: no limit beyond the role")
    orgs: Literal["all"] | list[str] = Field(description='"all": every org of its owner, now and future')
    projects: Literal["all"] | list[str]
    allowed_ips: list[str] | None = Field(description="CIDR networks; null: any address")
    rate_limit: str | None = Field(description="Its own limit (N/PERIOD); null: the configured default")
    status: KeyStatus
    expires_at: datetime | None
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None
    rotated_to: str | None = Field(description="The key it was rotated to, if any")
    effective_role: dict[str, RoleName] = Field(
        description="Its role in each org it acts in (as the caller sees them): the lower of its own and its owner's"
    )
    stopped_in: list[str] = Field(
        default_factory=list, description="The orgs whose admins stopped it (only on the caller's own keys)"
    )
    owner_name: str | None = Field(
        None, description="Its owner as shown: a person's email, a service account's name (listings and reads)"
    )
    owner_kind: Literal["human", "service"] | None = Field(None, description="Whether its owner is a person")
    last_used_ip: str | None = Field(None, description="The client address of its last use seen (listings and reads)")
    project_names: dict[str, str] = Field(default_factory=dict, description="The name of each of its projects")


class NewKey(Key):
    """A key just made: with the raw key, shown this once."""

    key: str = Field(description="The raw key: shown only now, never again")


class RotatedKey(NewKey):
    """The new key, with its raw key shown this once."""

    rotated_from: str = Field(description="The key it replaces, which expires after the grace period")


class RevokedKey(Key):
    """The key, revoked. An admin who stops another member's key in their orgs only (it acts elsewhere
    too) is answered with `status: revoked` and the orgs it was stopped in."""

    revoked_in: list[str] = Field(default_factory=list, description="The orgs it was stopped in (an admin's stop)")


class KeyPage(Answer):
    """A page of keys."""

    items: list[Key]
    next_cursor: str | None = Field(description="Pass as cursor for the next page; null: the last page")


class UsageDay(Answer):
    """A key's requests on one UTC day."""

    day: date
    requests: int


class KeyUsage(Answer):
    """A key's requests per UTC day, oldest first, today included (every day listed, 0 when unused), summed
    from its aggregated `api_key.used` audit rows. Another member's key: its use in the caller's orgs only."""

    key_id: str
    days: int
    total: int
    items: list[UsageDay]


class RateLimitState(Answer):
    """The key's rate limit after this verification was charged to it."""

    limit: int = Field(description="The limit's burst (RateLimit-Limit)")
    remaining: int
    reset: int = Field(description="Seconds until the limit is full again")


class Verdict(Answer):
    """`POST /v1/keys/verify`: a refusal is a verdict too (valid false, with the contract's code)."""

    valid: bool
    code: str = Field(
        pattern=r"^[A-Z_]+$",
        description="VALID, or the contract's error code upper-cased (INVALID_API_KEY, ORG_NOT_ALLOWED, ...)",
    )
    key_id: str | None = Field(description="The key id, once the key had a valid shape")
    org: str | None
    role: RoleName | None
    scopes: list[str] = Field(description="The effective permission patterns (X-Scopes)")
    env: Env | None
    expires_at: datetime | None
    ratelimit: RateLimitState | None


# --- orgs, members, invitations ------------------------------------------------------------------


class Org(Answer):
    """An org."""

    id: str
    name: str


class OrgWithRole(Org):
    """An org and the caller's role in it."""

    role: RoleName = Field(description="The caller's effective role in it")


class Me(Answer):
    """The calling credential."""

    user_id: str
    key_id: str
    orgs: list[OrgWithRole] = Field(description="The orgs the calling credential can act in")


class OrgList(Answer):
    """The orgs the calling credential can act in, by name."""

    items: list[OrgWithRole]


class Member(Answer):
    """A member: a person or one of the org's service accounts."""

    user_id: str
    email: str | None = Field(description="null for a service account")
    kind: Literal["human", "service"]
    name: str | None = Field(description="A service account's name")
    role: RoleName


class MemberList(Answer):
    """The org's members."""

    items: list[Member]


class Membership(Answer):
    """The member's new role."""

    org_id: str
    user_id: str
    role: RoleName


class MembershipChanged(Membership):
    """Inviting a current member changes their role at once."""

    status: Literal["member"]


class MembershipRemoved(Answer):
    """The member was removed."""

    org_id: str
    user_id: str
    removed: Literal[True]


class Invitation(Answer):
    """An invitation to join an org, which only the invited user accepts."""

    id: str
    org_id: str
    org_name: str
    user_id: str
    email: str
    role: RoleName
    invited_by: str | None = Field(description="The inviting user's id (cli: the operator)")
    invited_by_name: str | None = Field(None, description="The inviting user's email (the invitee's own listing)")
    status: InvitationStatus
    created_at: datetime
    expires_at: datetime


class InvitationList(Answer):
    """Open invitations, oldest first."""

    items: list[Invitation]


# --- projects, service accounts, audit -----------------------------------------------------------


class Project(Answer):
    """A project of an org."""

    id: str
    org_id: str
    name: str


class ProjectList(Answer):
    """The org's projects (those within the calling key's projects), by name."""

    items: list[Project]


class ProjectDeleted(Answer):
    """The project was deleted."""

    id: str
    deleted: Literal[True]
    revoked_keys: list[str] = Field(description="The keys that named it, revoked or stopped in this org")


class ServiceAccount(Answer):
    """A service account: a non-human member of one org, owning keys of that org."""

    id: str
    org_id: str
    name: str
    role: RoleName


class ServiceAccountList(Answer):
    """The org's service accounts, by name."""

    items: list[ServiceAccount]


class AuditEvent(Answer):
    """One audit event of the org."""

    id: int
    at: datetime
    type: str = Field(examples=["api_key.created"])
    actor: str | None = Field(description="The user who acted (cli: the operator); null for auth.failed")
    org_id: str
    user_id: str | None
    key_id: str | None
    target: str | None
    ip: str | None
    user_agent: str | None
    count: int = Field(description="How many events an aggregated auth.failed row stands for (else 1)")
    detail: dict[str, Any]
    actor_name: str | None = Field(None, description="The acting user's email (a service account's name)")
    user_name: str | None = Field(None, description="The email or name of the user the event concerns")
    key_name: str | None = Field(None, description="The name of the key the event concerns")


class AuditPage(Answer):
    """A page of audit events, newest first."""

    items: list[AuditEvent]
    next_cursor: str | None = Field(description="Pass as cursor for older events; null: the last page")


# --- sessions and tokens -----------------------------------------------------------------------------


class SessionView(Answer):
    """A browser session (never its cookie)."""

    id: str = Field(description="Names the session in listings; not usable as a cookie")
    active_org: str | None
    created: datetime
    last_seen: datetime
    user_agent: str
    address: str | None
    signed_in_with_key: str | None = Field(description="The key the web page signed in with (it caps the session)")
    current: bool = Field(description="Whether this is the calling session")


class SessionCookie(Answer):
    """The cookie to set on the user's browser (Set-Cookie attributes)."""

    name: str
    value: str
    path: str
    http_only: bool
    secure: bool
    same_site: str
    max_age: int


class IssuedSession(Answer):
    """A new session: its cookie (shown this once) and CSRF token."""

    session: SessionView
    csrf: str = Field(description="For X-CSRF-Token on /v1/ writes with the cookie (or send an allowed Origin)")
    cookie: SessionCookie


class SessionList(Answer):
    """The caller's live sessions, newest first."""

    items: list[SessionView]


class SwitchedSession(Answer):
    """The session, its active org switched (every replica's next request sees it)."""

    session: SessionView


class Ended(Answer):
    """Ended: the session (or all of them, and every token family) no longer authenticates."""

    ended: bool


class TokenPair(Answer):
    """An access token (a JWT) and the refresh token that renews it (shown this once; single use)."""

    access_token: str
    token_type: Literal["Bearer"]
    expires_in: int = Field(description="Seconds the access token is valid")
    refresh_token: str
    refresh_expires_in: int = Field(description="Seconds the refresh token is valid if unused")
    scope: str = Field(description="The permission patterns granted, space-separated")


class Revoked(Answer):
    """RFC 7009: answered whether or not the token was valid."""


RESPONSES: tuple[type[Answer], ...] = (
    SessionView,
    SessionCookie,
    IssuedSession,
    SessionList,
    SwitchedSession,
    Ended,
    TokenPair,
    Revoked,
    Key,
    NewKey,
    RotatedKey,
    RevokedKey,
    KeyPage,
    UsageDay,
    KeyUsage,
    Verdict,
    Org,
    OrgWithRole,
    Me,
    OrgList,
    Member,
    MemberList,
    Membership,
    MembershipChanged,
    MembershipRemoved,
    Invitation,
    InvitationList,
    Project,
    ProjectList,
    ProjectDeleted,
    ServiceAccount,
    ServiceAccountList,
    AuditEvent,
    AuditPage,
)
