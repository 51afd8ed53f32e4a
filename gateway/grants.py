"""Issuing, refreshing and revoking JWT access tokens and their refresh tokens (management: each call one
transaction). A token pair carries a `Grant`; refresh tokens are opaque (256 bits from `secrets`), stored
as HMAC digests only, single use and rotated on every refresh. Presenting an already-rotated one revokes its
whole family (`token.reuse_detected`), except the immediately previous one within `tokens.reuse_grace_s`,
once (a client's retry whose answer was lost). Verification is the hot path's (`gateway.tokens`)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web
from joserfc import jwt
from joserfc.errors import JoseError

from gateway.audit import Actor, write_event
from gateway.backends import Conn
from gateway.config import RolesConfig, TokensConfig
from gateway.data import keys, orgs
from gateway.data import tokens as data
from gateway.data.db import Database, new_id, notify
from gateway.errors import ExpiredToken, InvalidToken, NotFound, OrgNotAllowed
from gateway.keys import b62encode
from gateway.signing import ALGORITHMS, SigningKeys, SigningUnavailable, eddsa_allowed
from gateway.tokens import AccessTokens, UnknownKid, looks_like_jwt

REFRESH_MARK = "_rt_"


@dataclass(frozen=True)
class Grant:
    """What a token pair may do: never more than its issuer could (see gateway.api's /v1/tokens)."""

    user_id: str
    org: str
    role: str
    scopes: tuple[str, ...]
    projects: tuple[str, ...] | None
    key_id: str | None  # the key it was issued with: its limits hold for the tokens (see Verifier)
    key_expires_at: float | None = None  # and the family ends with the key


def _refresh_digest(pepper: bytes, raw: str) -> bytes:
    return hmac.new(pepper, b"refresh\0" + raw.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()


async def _key_acts_in(conn: Conn, key_id: str, org_id: str) -> bool:
    """The key a family was issued with is still live and not stopped in the family's org."""
    row = await keys.get(conn, key_id)
    now = datetime.now(UTC)
    if row is None or row.revoked_at is not None or (row.expires_at is not None and row.expires_at <= now):
        return False
    return not any(b.org_id == org_id for b in await keys.blocks(conn, [key_id]))


class TokenService:
    """Issuing, refreshing and revoking (management: each call one transaction)."""

    def __init__(
        self,
        db: Database,
        keys: SigningKeys,
        cfg: TokensConfig,
        pepper: bytes,
        prefix: str,
        on_revoked: Callable[[list[str]], None] | None = None,
    ) -> None:
        # Told the families this process revoked, once committed: applied here at once (the others learn
        # by NOTIFY), so the caller's next request already sees it.
        self.on_revoked = on_revoked
        self.db = db
        self.keys = keys
        self.cfg = cfg
        self.pepper = pepper
        self.prefix = prefix

    def _check_can_sign(self) -> None:
        if not self.keys.can_sign:
            raise NotFound("this gateway issues no tokens: set GATEWAY_SIGNING_SECRET (tokens.signing_secret)")

    async def issue(self, grant: Grant, actor: Actor, ttl_s: float | None = None) -> dict[str, Any]:
        self._check_can_sign()
        family_id = new_id("fam")
        refresh = self._new_refresh()
        expires = datetime.now(UTC) + timedelta(seconds=self.cfg.refresh_ttl_s)
        if grant.key_expires_at is not None:
            expires = min(expires, datetime.fromtimestamp(grant.key_expires_at, UTC))
        async with self.db.connect(transaction=True) as conn:
            await data.insert_family(
                conn,
                data.NewFamily(
                    family_id,
                    grant.user_id,
                    grant.org,
                    grant.role,
                    list(grant.scopes),
                    list(grant.projects) if grant.projects is not None else None,
                    grant.key_id,
                    expires,
                ),
            )
            await data.insert_refresh(conn, _refresh_digest(self.pepper, refresh), family_id, 1)
            await write_event(
                conn,
                "token.issued",
                actor=actor,
                org_id=grant.org,
                user_id=grant.user_id,
                target=family_id,
                detail={"role": grant.role, "scopes": list(grant.scopes)},
            )
        left = (expires - datetime.now(UTC)).total_seconds()
        return self._pair(grant, family_id, refresh, min(ttl_s or self.cfg.access_ttl_s, left), left)

    def _new_refresh(self) -> str:
        return f"{self.prefix}{REFRESH_MARK}{b62encode(secrets.token_bytes(32), 43)}"

    def _pair(self, grant: Grant, family_id: str, refresh: str, ttl_s: float, refresh_left_s: float) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.cfg.issuer,
            "aud": self.cfg.audience,
            "sub": grant.user_id,
            "org": grant.org,
            "role": grant.role,
            "scope": " ".join(grant.scopes),
            "sid": family_id,
            "jti": secrets.token_urlsafe(16),
            "iat": now,
            "nbf": now,
            "exp": now + int(ttl_s),
        }
        if grant.projects is not None:
            claims["prj"] = list(grant.projects)
        if grant.key_id is not None:
            claims["key"] = grant.key_id
        try:
            access = self.keys.sign(claims)
        except SigningUnavailable:
            raise NotFound("this gateway issues no tokens: its signing key cannot be used") from None
        return {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": int(ttl_s),
            "refresh_token": refresh,
            "refresh_expires_in": int(min(refresh_left_s, self.cfg.refresh_idle_s)),
            "scope": claims["scope"],
        }

    async def refresh(self, raw: str, actor: Actor, roles: RolesConfig) -> dict[str, Any]:
        """A new pair for a refresh token, which is spent. Reuse revokes the family (committed), then
        refuses."""
        self._check_can_sign()
        digest = _refresh_digest(self.pepper, raw)
        reused: data.FamilyRow | None = None
        async with self.db.connect(transaction=True) as conn:
            family_id = await data.refresh_family_of(conn, digest)
            family = await data.family(conn, family_id, lock=True) if family_id is not None else None
            cfg = self.cfg
            found = family is not None
            state = await data.refresh_state(conn, digest, cfg.reuse_grace_s, cfg.refresh_idle_s) if found else None
            if family is None or state is None:
                raise InvalidToken("not a refresh token")
            if family.revoked_at is not None:
                raise InvalidToken("this refresh token's family was revoked")
            if state.lapsed:
                raise InvalidToken("this refresh token has expired: sign in again")
            fresh = state.rotated_at is None and state.seq == state.latest
            retry = state.seq == state.latest - 1 and state.in_grace
            if not (fresh or retry):
                await data.revoke_family(conn, family.id, "reuse_detected")
                await notify(conn, families=[family.id])
                await write_event(
                    conn,
                    "token.reuse_detected",
                    actor=actor,
                    org_id=family.org_id,
                    user_id=family.user_id,
                    target=family.id,
                    detail={"seq": state.seq, "latest": state.latest},
                )
                reused = family
            else:
                member_role = await orgs.role(conn, family.org_id, family.user_id)
                if member_role is None:
                    raise OrgNotAllowed("the user is no longer a member of this token's org")
                if family.key_id is not None and not await _key_acts_in(conn, family.key_id, family.org_id):
                    raise InvalidToken("the key this token was issued with no longer acts in its org")
                await data.mark_refresh_rotated(conn, family.id, state.latest)
                refresh = self._new_refresh()
                await data.insert_refresh(conn, _refresh_digest(self.pepper, refresh), family.id, state.latest + 1)
                await data.touch_family(conn, family.id)
                await write_event(
                    conn,
                    "token.refreshed",
                    actor=actor,
                    org_id=family.org_id,
                    user_id=family.user_id,
                    target=family.id,
                    detail={"retry": retry} if retry else None,
                )
        if reused is not None:
            self._revoked([reused.id])
            raise InvalidToken("this refresh token was already used: its family is revoked")
        grant = Grant(
            family.user_id,
            family.org_id,
            family.role,
            tuple(family.scopes or ()),
            tuple(family.project_ids) if family.project_ids is not None else None,
            family.key_id,
        )
        left = (family.expires_at - datetime.now(UTC)).total_seconds()
        return self._pair(grant, family.id, refresh, min(self.cfg.access_ttl_s, left), left)

    async def family_of(self, raw: str, access: AccessTokens) -> str | None:
        """The family a refresh token or an access token (its signature verified, expired or not) belongs
        to; None for anything else."""
        if REFRESH_MARK in raw and not looks_like_jwt(raw):
            async with self.db.connect() as conn:
                return await data.refresh_family_of(conn, _refresh_digest(self.pepper, raw))
        if looks_like_jwt(raw):
            try:
                return access.decode(raw).sid
            except ExpiredToken:
                pass
            except InvalidToken:
                return None
            try:  # expired: its signature still names the family
                with eddsa_allowed():
                    token = jwt.decode(raw, access.key_for, algorithms=list(ALGORITHMS))
            except (JoseError, ValueError, TypeError, InvalidToken, UnknownKid):
                return None
            sid = token.claims.get("sid")
            return sid if isinstance(sid, str) else None
        return None

    async def revoke(self, family_id: str, why: str, actor: Actor) -> bool:
        async with self.db.connect(transaction=True) as conn:
            found = await data.family(conn, family_id)
            if found is None or not await data.revoke_family(conn, family_id, why):
                return False
            await notify(conn, families=[family_id])
            await write_event(
                conn,
                "token.revoked",
                actor=actor,
                org_id=found.org_id,
                user_id=found.user_id,
                target=family_id,
                detail={"why": why},
            )
        self._revoked([family_id])
        return True

    def _revoked(self, family_ids: list[str]) -> None:
        if self.on_revoked is not None and family_ids:
            self.on_revoked(family_ids)

    async def revoke_user(self, user_id: str, why: str, actor: Actor) -> int:
        """Every live family of the user (signing out everywhere): their access tokens stop at once."""
        async with self.db.connect(transaction=True) as conn:
            ids = await data.revoke_user_families(conn, user_id, why)
            if ids:
                await notify(conn, families=ids)
                await write_event(
                    conn,
                    "token.revoked",
                    actor=actor,
                    user_id=user_id,
                    target=user_id,
                    detail={"why": why, "families": len(ids)},
                )
        self._revoked(ids)
        return len(ids)


GRANTS = web.AppKey("grants", TokenService)
