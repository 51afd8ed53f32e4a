"""JWT signing keys: kept in Postgres, published at `/.well-known/jwks.json`, rotated by `gateway
signing-keys rotate`.

A key is `next` (published, signs nothing yet), `current` (signs), `previous` (published until every
token it signed has expired) or `retired`. Rotation makes next current and publishes a new next in one
transaction, so every verifier has held the key a token is signed with before the token exists (every
process reloads the set on NOTIFY, and at least every `C.SIGNING_KEYS_RELOAD_S`).

The private part is stored encrypted (AES-256-GCM, the key id as associated data) under a key derived
(HKDF-SHA256) from `tokens.signing_secret` (`GATEWAY_SIGNING_SECRET`); it never appears in a log, an error
or a listing. A process without the secret verifies tokens (public keys suffice) but signs none.
All JOSE work is joserfc's (no hand-written signing or parsing).
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from joserfc import jwt
from joserfc.errors import SecurityWarning
from joserfc.jwk import ECKey, OKPKey

from gateway import constants as C
from gateway.audit import CLI, Actor, write_event
from gateway.backends import Conn
from gateway.config import TokensConfig
from gateway.data import tokens as data
from gateway.data.db import Database, notify
from gateway.data.tokens import SigningKeyRow
from gateway.keys import random_b62

log = logging.getLogger("gateway.signing")


@contextlib.contextmanager
def eddsa_allowed() -> Iterator[None]:
    """RFC 9864 names the algorithm `Ed25519`; `EdDSA` (RFC 8037) is what the contract and today's
    verifiers know, and joserfc warns of it on every call. The choice is deliberate: not repeated."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="EdDSA is deprecated", category=SecurityWarning)
        yield


ALGORITHMS = ("EdDSA", "ES256")
Key = OKPKey | ECKey


class SigningUnavailable(Exception):
    """This process cannot sign: no secret, no current key, or a key the secret does not open."""


def _cipher(secret: str) -> AESGCM:
    kdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"gateway signing keys v1")
    return AESGCM(kdf.derive(secret.encode()))


def generate(alg: str, kid: str) -> Key:
    if alg == "EdDSA":
        return OKPKey.generate_key("Ed25519", parameters={"kid": kid, "alg": alg, "use": "sig"})
    return ECKey.generate_key("P-256", parameters={"kid": kid, "alg": alg, "use": "sig"})


def public_key(row: SigningKeyRow) -> Key:
    jwk = json.loads(row.public_jwk)
    return OKPKey.import_key(jwk) if row.alg == "EdDSA" else ECKey.import_key(jwk)


@dataclass(frozen=True)
class PublishedKey:
    kid: str
    alg: str
    state: str
    key: Key


class SigningKeys:
    """This process's view of the key set: the published public keys and, with the secret, the signer."""

    def __init__(self, db: Database, cfg: TokensConfig) -> None:
        self.db = db
        self.cfg = cfg
        self.published: dict[str, PublishedKey] = {}
        self.jwks: dict[str, Any] = {"keys": []}
        self._signer: tuple[str, str, Key] | None = None  # kid, alg, private key
        self._cipher = _cipher(cfg.signing_secret.get()) if cfg.signing_secret.get() else None

    @property
    def can_sign(self) -> bool:
        return self._signer is not None

    async def load(self) -> None:
        """Read the published keys (and the signer). With the secret and no key yet, make the first two."""
        async with self.db.connect() as conn:
            rows = await data.signing_keys(conn)
            if self._cipher is not None and not any(r.state == "current" for r in rows):
                await self._bootstrap(conn)
                rows = await data.signing_keys(conn)
            signer = await data.signer(conn) if self._cipher is not None else None
        self.published = {r.kid: PublishedKey(r.kid, r.alg, r.state, public_key(r)) for r in rows}
        self.jwks = {"keys": [{**json.loads(r.public_jwk), "alg": r.alg, "use": "sig"} for r in rows]}
        self._signer = None
        if signer is not None and self._cipher is not None:
            try:
                pem = self._cipher.decrypt(signer.private_enc[:12], signer.private_enc[12:], signer.kid.encode())
            except InvalidTag:
                log.error("signing key %s cannot be opened with tokens.signing_secret: issuing no tokens", signer.kid)
                return
            key: Key = OKPKey.import_key(pem) if signer.alg == "EdDSA" else ECKey.import_key(pem)
            self._signer = (signer.kid, signer.alg, key)

    async def _bootstrap(self, conn: Conn) -> None:
        """The first current and next keys; a process racing us makes them instead (nothing twice)."""
        async with conn.transaction():
            await data.lock_signing_keys(conn)
            states = {r.state for r in await data.signing_keys(conn)}
            for state in ("current", "next"):
                if state not in states:
                    await self.insert(conn, state)
            await notify(conn, signing_keys=True)

    async def insert(self, conn: Conn, state: str) -> str:
        if self._cipher is None:
            raise SigningUnavailable("tokens.signing_secret is not set")
        kid = "sk_" + random_b62(16)
        alg = self.cfg.algorithm
        key = generate(alg, kid)
        nonce = secrets.token_bytes(12)
        enc = nonce + self._cipher.encrypt(nonce, key.as_pem(private=True), kid.encode())
        await data.insert_signing_key(conn, kid, alg, json.dumps(key.as_dict(private=False)), enc, state)
        return kid

    async def rotate(self, actor: Actor = CLI) -> dict[str, str]:
        """next -> current, current -> previous (kept for `tokens.access_ttl_s` + leeway), a new next."""
        keep = C.MAX_ACCESS_TTL_S + self.cfg.leeway_s  # whatever ttl each token was given: at most this
        async with self.db.connect(transaction=True) as conn:
            await data.lock_signing_keys(conn)
            states = {r.state: r.kid for r in await data.signing_keys(conn)}
            if "next" not in states:  # never bootstrapped: the new current is published from now on
                await self.insert(conn, "next")
            await data.rotate_signing_keys(conn, keep)
            new_next = await self.insert(conn, "next")
            signer = await data.signer(conn)
            current = signer.kid if signer is not None else ""
            await write_event(conn, "signing_key.rotated", actor=actor, target=current, detail={"next": new_next})
            await notify(conn, signing_keys=True)
        return {"current": current, "next": new_next}

    def sign(self, claims: dict[str, Any]) -> str:
        if self._signer is None:
            raise SigningUnavailable("this gateway issues no tokens")
        kid, alg, key = self._signer
        with eddsa_allowed():
            return jwt.encode({"alg": alg, "kid": kid, "typ": "at+jwt"}, claims, key, algorithms=[alg])


async def listing(db: Database) -> list[SigningKeyRow]:
    async with db.connect() as conn:
        return await data.signing_keys(conn, published_only=False)
