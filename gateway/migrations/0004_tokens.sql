-- JWT signing keys: the public part as a JWK (published at /.well-known/jwks.json while the key is next,
-- current or previous), the private part encrypted (AES-GCM) under a key from the environment.
CREATE TABLE signing_keys (
    kid           text PRIMARY KEY,
    alg           text NOT NULL CHECK (alg IN ('EdDSA', 'ES256')),
    public_jwk    jsonb NOT NULL,
    private_enc   bytea NOT NULL,
    state         text NOT NULL CHECK (state IN ('next', 'current', 'previous', 'retired')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    activated_at  timestamptz,
    -- A previous key stays published until every token it signed has expired.
    retire_after  timestamptz
);
-- At most one key signs, and at most one waits to.
CREATE UNIQUE INDEX signing_keys_one_current_idx ON signing_keys (state) WHERE state IN ('current', 'next');

-- A refresh family: the grant behind a chain of refresh tokens, and the `sid` of its access tokens.
CREATE TABLE token_families (
    id            text PRIMARY KEY,
    user_id       text NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    org_id        text NOT NULL REFERENCES orgs(id) ON DELETE CASCADE,
    role          text NOT NULL,
    scopes        text[],                 -- NULL: all the role grants
    project_ids   text[],                 -- NULL: all projects
    key_id        text,                   -- the API key it was issued with, if any (its cap)
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_used_at  timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL,   -- absolute end of the family
    revoked_at    timestamptz,
    revoked_why   text
);
CREATE INDEX token_families_user_idx ON token_families (user_id) WHERE revoked_at IS NULL;

-- Every refresh token a family ever had, by HMAC digest (the token itself is never stored): the one not
-- yet rotated is the family's current token; any other presented again is a reuse.
CREATE TABLE refresh_tokens (
    digest        bytea PRIMARY KEY,
    family_id     text NOT NULL REFERENCES token_families(id) ON DELETE CASCADE,
    seq           integer NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    rotated_at    timestamptz,
    UNIQUE (family_id, seq)
);
