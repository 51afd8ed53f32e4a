"""The one path from a credential to a decision, for every entry point: the proxy endpoints (`/auth/*`),
`POST /v1/keys/verify`, the `/v1/` API and the web page (sign-in and every session call).

- `authenticate(raw, address)`: the key's record, through the cache tiers (in-process, Redis, Postgres
  plus argon2). All brute-force accounting is here: a failed verification is charged to the address's
  failure budget, whichever entry point it came through, and the budgets checked before a Postgres
  lookup and before an argon2 run are this object's `before_lookup` and `before_argon2`, which the
  resolver calls at those moments of a load (it decides nothing about budgets itself).
- `authorize(record, decision, client)`: the key's state (revoked, expired, allowlist) and what the route
  requires, as an `Identity`. A known key refused here still spends a request of its own limit, and the
  refusal says where it stands.
- `charge(identity)`: the request against the key's limit and its org's, or raises `RateLimited`.

Entry points differ only in where they read the credential and the route; what they are charged and
how a failure is counted is decided here, once.
"""

from __future__ import annotations

import dataclasses
import time

from gateway import constants as C
from gateway.authz import (
    KeyResolver,
    ProjectDirectory,
    authorize,
    check_project,
    check_state,
    granted,
    role_in,
)
from gateway.backends import StoreUnavailable
from gateway.config import RolesConfig
from gateway.errors import (
    AuthUnavailable,
    ExpiredApiKey,
    GatewayError,
    InsufficientPermissions,
    InvalidApiKey,
    InvalidToken,
    MissingCredentials,
    RevokedApiKey,
)
from gateway.fresh import FreshMap
from gateway.keys import KeyFormat, ParsedKey
from gateway.metrics import Metrics
from gateway.models import IP, Identity, KeyRecord
from gateway.policy import RouteDecision
from gateway.ratelimit import BruteForceGuard, Decision, Limit, Limits, RateLimiter, address_bucket, enforce
from gateway.sessions import Session
from gateway.store import Store
from gateway.tokens import AccessTokens, Claims

# A user's memberships (org -> role), read fresh for sessions and tokens.
Memberships = FreshMap[dict[str, str]]


class Verifier:
    def __init__(
        self,
        fmt: KeyFormat,
        resolver: KeyResolver,
        projects: ProjectDirectory,
        store: Store,
        limiter: RateLimiter | None,
        limits: Limits,
        roles: RolesConfig,
        metrics: Metrics,
        guard: BruteForceGuard | None,
        members: Memberships | None = None,
        tokens: AccessTokens | None = None,
        key_records: FreshMap[KeyRecord | None] | None = None,
    ) -> None:
        self.fmt = fmt
        self.members = members
        # Keys by id, for sessions signed in with one and tokens issued with one (no secret to look them up
        # by): kept fresh by the same invalidations as the key cache.
        self.key_records = key_records
        self.tokens = tokens
        # The record made for a token or session and what it was made from (the memberships, or the key's
        # cached record): reused, with the identities it memoises, while that is still the current one.
        self._made: dict[str, tuple[object, KeyRecord]] = {}
        self.guard = guard
        self.resolver = resolver
        resolver.checkpoints = self  # its loads ask this object before a lookup and before an argon2 run
        self.projects = projects
        self.store = store
        self.limiter = limiter
        self.limits = limits
        self.roles = roles
        self.metrics = metrics

    # --- the resolver's checkpoints (see authz.Checkpoints) --------------------------------------

    async def before_lookup(self, address: str | None) -> None:
        if self.guard is not None:
            await self.guard.before_lookup(address)

    async def before_argon2(self, key_id: str, address: str | None) -> None:
        if self.guard is not None:
            await self.guard.before_argon2(key_id, address)

    async def verified(self, key_id: str, address: str | None) -> None:
        if self.guard is not None:
            await self.guard.verified(key_id, address)

    def parse(self, raw: str) -> ParsedKey:
        """The key's parts; a bad shape or checksum is refused with no I/O at all (not even a counter)."""
        parsed = self.fmt.parse(raw)
        if parsed is None:
            raise InvalidApiKey()
        return parsed

    async def authenticate(self, key: ParsedKey, address: IP | None) -> KeyRecord:
        """The key's record; its state is not judged yet. A failed verification counts against
        `address`'s failure budget (the client's, or for `/v1/keys/verify` the calling service's)."""
        try:
            return await self.resolver.resolve(key, address)
        except InvalidApiKey as err:
            if self.guard is not None:
                err.headers.update((await self.guard.failed(_text(address))).headers(retry=False))
            raise

    async def authorize(
        self, record: KeyRecord, decision: RouteDecision, client: IP | None, permission: str | None = None
    ) -> Identity:
        """The key's identity for this route (state, org, role, permission, project), and `permission`
        too when a caller asks for one (`/v1/keys/verify`)."""
        try:
            identity = authorize(record, decision, client, self.roles, time.time())
            await check_project(identity, self.projects)
            if permission is not None and not granted(identity.scopes, permission):
                raise InsufficientPermissions(f"requires {permission}")
        except GatewayError as err:
            # Refused, but the key is known: its request still counts, and the answer says where it stands.
            if self.limiter is not None and err.status in (401, 403):
                (spent,) = await self.limiter.check([(self.limits.for_key(record.rate_limit), record.id)])
                err.headers.update(spent.headers(retry=False))
            raise
        return identity

    def check_state(self, record: KeyRecord, client: IP | None) -> None:
        """Revoked, expired or outside its allowlist: refused whatever the route (management calls)."""
        check_state(record, client, time.time())

    async def charge(self, record: KeyRecord | Identity, org: str | None) -> Decision | None:
        """One request of the key, and of `org` when the request acts in one: every entry point alike. A
        session or token that no key caps spends its user's limit (the key limit, per user)."""
        key_id = (record.id if isinstance(record, KeyRecord) else record.key_id) or record.user_id
        charges: list[tuple[Limit, str]] = [(self.limits.for_key(record.rate_limit), key_id)]
        if org is not None:
            charges.append((self.limits.org, org))
        return await self._charge(charges)

    async def charge_anonymous(self, address: IP | None) -> Decision | None:
        return await self._charge([(self.limits.anonymous, address_bucket(_text(address)))])

    async def charge_sign_in(self, address: IP | None) -> Decision | None:
        return await self._charge([(self.limits.sign_in, address_bucket(_text(address)))])

    def org_of(self, record: KeyRecord, org: str | None) -> str | None:
        """`org` if the key acts there (then its limit is charged too), else None."""
        return org if org is not None and role_in(record, org, self.roles) is not None else None

    async def session_record(self, key_id: str, client: IP | None, *, current: bool = False) -> KeyRecord | None:
        """A web session's key: from this process's cache when it holds the key fresh (kept current by
        invalidations), else, or when `current` is asked, from Postgres. Revoked or expired keys are
        refused."""
        record = None if current else self.resolver.local.record_of(key_id)
        if record is None and not current and self.key_records is not None:
            record = await self.key_records.get(key_id)
            if record is None:
                return None
        if record is None:
            try:
                loaded = await self.store.load_key(key_id, primary=current)
            except StoreUnavailable:
                raise AuthUnavailable("the key store is unreachable") from None
            if loaded is None:
                return None
            record = loaded[0]
        self.check_state(record, client)
        return record

    async def current(self, record: KeyRecord, client: IP | None) -> KeyRecord:
        """The key as Postgres has it now, for a management call: it acts on what it reads, so it must
        see its own writes (an org just created, a member just added) before the cache's invalidation
        arrives. Its secret was verified through the cache; only its state and memberships are re-read.
        A token's or keyless session's record keeps its own limits: only the memberships are re-read (the
        key's, for a token issued with one)."""
        if record.method == "jwt" or not record.id:
            if not record.id:
                memberships = await self.memberships(record.user_id, current=True)
            else:
                key = await self.session_record(record.id, client, current=True)
                if key is None:
                    raise InvalidToken("the key this token was issued with is gone")
                memberships = key.memberships
            return dataclasses.replace(record, memberships=dict(memberships))
        fresh = await self.session_record(record.id, client, current=True)
        if fresh is None:
            raise InvalidApiKey()
        return dataclasses.replace(fresh, method=record.method) if record.method != "api_key" else fresh

    # --- sessions and tokens ------------------------------------------------------------------------

    async def memberships(self, user_id: str, *, current: bool = False) -> dict[str, str]:
        """The user's org -> role: fresh (pushed invalidations), or with `current` read from Postgres now."""
        if self.members is None:
            raise AuthUnavailable("memberships are not available")
        if current:
            try:
                return (await self.store.memberships([user_id], primary=True))[user_id]
            except StoreUnavailable:
                raise AuthUnavailable("the key store is unreachable") from None
        return await self.members.get(user_id)

    async def token_record(self, raw: str, client: IP | None) -> KeyRecord:
        """A verified access token as a record: its role, org, scopes and projects, met with the user's
        current membership (effective role = min(token role, membership role), computed fresh). A token
        issued with a key keeps that key's limits too: its role, state, env, allowlist and rate limit,
        and the orgs it may act in (stopped in one by its admins, stopped there for the token too)."""
        if self.tokens is None:
            raise InvalidToken("this gateway verifies no access tokens")
        claims = await self.tokens.verify(raw)
        if claims.key is None:
            return self._made_record(claims.jti, await self.memberships(claims.sub), claims)
        try:
            key = await self.session_record(claims.key, client)
        except (RevokedApiKey, ExpiredApiKey):
            raise InvalidToken("the key this token was issued with is no longer valid") from None
        if key is None or key.user_id != claims.sub:
            raise InvalidToken("the key this token was issued with is gone")
        return self._made_record(claims.jti, key.memberships, claims, key)

    async def session_principal(self, session: Session, client: IP | None, *, current: bool = False) -> KeyRecord:
        """A session as a record: the key it was signed in with (which caps it) or, for a session issued
        to a user, the user with their membership role (within what its issuer could grant: its org, its
        role there)."""
        if session.key_id is not None:
            record = await self.session_record(session.key_id, client, current=current)
            if record is None:
                raise MissingCredentials("the session has ended: sign in again")
            ident = "k:" + session.handle
            made = self._made.get(ident)
            if made is not None and made[0] is record:  # the key's cached record, unchanged: reuse ours
                return made[1]
            return self._remember(ident, record, dataclasses.replace(record, method="session"))
        memberships = await self.memberships(session.user_id, current=current)
        return self._made_record("s:" + session.handle, memberships, session)

    def _made_record(
        self, ident: str, memberships: dict[str, str], made_of: Claims | Session, key: KeyRecord | None = None
    ) -> KeyRecord:
        made = self._made.get(ident)
        if made is not None and made[0] is memberships:
            return made[1]
        if isinstance(made_of, Session):
            orgs = made_of.orgs
            record = KeyRecord(
                id="", user_id=made_of.user_id, name="", role=made_of.role_cap or self.roles.order[-1], env="",
                scopes=None, all_orgs=orgs is None, org_ids=orgs or (), all_projects=True, project_ids=(),
                allowed_cidrs=None, rate_limit=None, expires_at=None, revoked_at=None,
                memberships=dict(memberships), method="session",
            )  # fmt: skip
        else:
            if made_of.role not in self.roles.order or (key is not None and key.role not in self.roles.order):
                raise InvalidToken("the token's role is not one this gateway knows")
            role = made_of.role if key is None else self.roles.lower(made_of.role, key.role)
            record = KeyRecord(
                id=key.id if key else "", user_id=made_of.sub, name="", role=role, env=key.env if key else "",
                scopes=made_of.scopes, all_orgs=False, org_ids=(made_of.org,), all_projects=made_of.projects is None,
                project_ids=made_of.projects or (), allowed_cidrs=key.allowed_cidrs if key else None,
                rate_limit=key.rate_limit if key else None, expires_at=key.expires_at if key else None,
                revoked_at=None, memberships=dict(memberships), method="jwt",
            )  # fmt: skip
        return self._remember(ident, memberships, record)

    def _remember(self, ident: str, source: object, record: KeyRecord) -> KeyRecord:
        if len(self._made) >= C.TOKEN_CACHE_MAX:
            self._made.clear()
        self._made[ident] = (source, record)
        return record

    async def _charge(self, charges: list[tuple[Limit, str]]) -> Decision | None:
        if self.limiter is None:
            return None
        return enforce(await self.limiter.check(charges), self.metrics)


def _text(address: IP | None) -> str | None:
    return str(address) if address is not None else None
