"""JWT access tokens and their refresh tokens.

- `AccessTokens` verifies a bearer JWT on the hot path: signature with a published key (`gateway.signing`),
  `alg` the key's own (EdDSA or ES256: never `none`, never HS*), `iss`, `aud`, `exp`/`nbf` within
  `tokens.leeway_s`, and the refresh family (`sid`) not revoked. A verified token is kept in-process by
  the HMAC digest of its text until it expires; the family's state is read fresh (`gateway.fresh`), so a
  revocation reaches every process by NOTIFY at once although the token has not expired.

Issuing, refreshing and revoking are management's (`gateway.grants`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from joserfc import jwt
from joserfc.errors import ExpiredTokenError, JoseError
from joserfc.jwk import GuestProtocol
from joserfc.jwt import JWTClaimsRegistry

from gateway import constants as C
from gateway.config import TokensConfig
from gateway.errors import ExpiredToken, InvalidToken
from gateway.fresh import FreshMap
from gateway.signing import ALGORITHMS, Key, SigningKeys, eddsa_allowed

log = logging.getLogger("gateway.tokens")


def looks_like_jwt(raw: str) -> bool:
    """A JWS compact serialisation (`eyJ...`.`...`.`...`), as opposed to an API key (base62 and `_`)."""
    return raw.startswith("eyJ") and raw.count(".") == 2


@dataclass(frozen=True, slots=True)
class Claims:
    """What a verified access token says."""

    sub: str
    org: str
    role: str
    scopes: tuple[str, ...]
    projects: tuple[str, ...] | None  # None: every project
    sid: str
    jti: str
    exp: float
    nbf: float
    key: str | None  # the API key it was issued with (`key` claim), whose limits it keeps


def _token_digest(pepper: bytes, raw: str) -> str:
    return hmac.new(pepper, b"jwt\0" + raw.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()


class UnknownKid(Exception):
    pass


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidToken(f"the token's {what} claim is not a list of strings")
    return tuple(value)


class AccessTokens:
    def __init__(self, keys: SigningKeys, cfg: TokensConfig, pepper: bytes, families: FreshMap[bool]) -> None:
        self.keys = keys
        self.cfg = cfg
        self.pepper = pepper
        self.families = families  # family id -> revoked
        self._verified: OrderedDict[str, Claims] = OrderedDict()
        self._registry = JWTClaimsRegistry(
            leeway=int(cfg.leeway_s),
            iss={"essential": True, "value": cfg.issuer},
            aud={"essential": True, "value": cfg.audience},
            **{
                name: {"essential": True} for name in ("sub", "org", "role", "scope", "sid", "jti", "iat", "nbf", "exp")
            },  # type: ignore[arg-type]
        )
        self._reloaded_at = 0.0
        self._reloading: asyncio.Task[None] | None = None

    async def verify(self, raw: str) -> Claims:
        """The token's claims, or InvalidToken / ExpiredToken. No I/O for a token seen before, but for its
        family's state when that is not fresh."""
        d = _token_digest(self.pepper, raw)
        claims = self._verified.get(d)
        if claims is None:
            claims = self.decode(raw)
            if len(self._verified) >= C.TOKEN_CACHE_MAX:
                self._verified.popitem(last=False)
            self._verified[d] = claims
        now = time.time()
        if now >= claims.exp + self.cfg.leeway_s:
            self._verified.pop(d, None)
            raise ExpiredToken("the access token has expired: refresh it")
        if now < claims.nbf - self.cfg.leeway_s:
            raise InvalidToken("the access token is not valid yet")
        if await self.families.get(claims.sid):
            raise InvalidToken("the access token was revoked")
        return claims

    def decode(self, raw: str) -> Claims:
        if len(raw) > C.MAX_TOKEN_LEN:
            raise InvalidToken("the access token is too long")
        try:
            with eddsa_allowed():
                token = jwt.decode(raw, self.key_for, algorithms=list(ALGORITHMS))
            self._registry.validate(token.claims)
        except UnknownKid:
            self._reload_soon()
            raise InvalidToken("the access token names no published key") from None
        except ExpiredTokenError:
            raise ExpiredToken("the access token has expired: refresh it") from None
        except (JoseError, ValueError, TypeError, KeyError):
            raise InvalidToken("the access token is not valid") from None
        c = token.claims
        text = ("sub", "org", "role", "scope", "sid", "jti")
        if not all(isinstance(c[n], str) for n in text) or not all(
            isinstance(c[n], int) and not isinstance(c[n], bool) for n in ("exp", "nbf", "iat")
        ):
            raise InvalidToken("the access token's claims are not of their types")
        projects = _strings(c["prj"], "prj") if "prj" in c else None
        key = c.get("key")
        if key is not None and not isinstance(key, str):
            raise InvalidToken("the token's key claim is not a key id")
        return Claims(
            c["sub"],
            c["org"],
            c["role"],
            tuple(c["scope"].split()),
            projects,
            c["sid"],
            c["jti"],
            c["exp"],
            c["nbf"],
            key,
        )

    def key_for(self, obj: GuestProtocol) -> Key:
        header = obj.headers()
        kid = header.get("kid")
        found = self.keys.published.get(kid) if isinstance(kid, str) else None
        if found is None:
            raise UnknownKid()
        if header.get("alg") != found.alg:  # a key signs with its own algorithm only
            raise InvalidToken("the token's alg is not its key's")
        return found.key

    def _reload_soon(self) -> None:
        """A key published since we last read the set (rare: NOTIFY brings rotations): re-read, at most
        once per `C.UNKNOWN_KID_RELOAD_S`, in the background."""
        now = time.monotonic()
        if now - self._reloaded_at < C.UNKNOWN_KID_RELOAD_S or self._reloading is not None:
            return
        self._reloaded_at = now

        async def reload() -> None:
            try:
                await self.keys.load()
            except Exception as exc:  # an outage: the next unknown kid tries again
                log.warning("re-reading the signing keys failed: %s", type(exc).__name__)
            finally:
                self._reloading = None

        self._reloading = asyncio.get_running_loop().create_task(reload())
