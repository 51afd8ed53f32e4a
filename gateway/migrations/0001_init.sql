-- Core schema: orgs, users, memberships, projects, api keys, audit events.
CREATE TABLE orgs (
    id          text PRIMARY KEY,
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE users (
    id          text PRIMARY KEY,
    email       text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE memberships (
    org_id      text NOT NULL REFERENCES orgs(id) ON DELETE CASCADE,
    user_id     text NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    role        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, user_id)
);
CREATE INDEX memberships_user_idx ON memberships (user_id);

CREATE TABLE projects (
    id          text PRIMARY KEY,
    org_id      text NOT NULL REFERENCES orgs(id) ON DELETE CASCADE,
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (org_id, name)
);

CREATE TABLE api_keys (
    id              text PRIMARY KEY,            -- the public key id, part of the key itself
    user_id         text NOT NULL REFERENCES users(id),
    name            text NOT NULL,
    role            text NOT NULL,
    env             text NOT NULL CHECK (env IN ('live', 'test')),
    secret_hash     text NOT NULL,               -- argon2id of the secret; the key itself is never stored
    start           text NOT NULL,               -- display prefix such as gw_live_ab12
    scopes          text[],                      -- NULL: no restriction beyond the role
    all_orgs        boolean NOT NULL,
    org_ids         text[] NOT NULL DEFAULT '{}',
    all_projects    boolean NOT NULL,
    project_ids     text[] NOT NULL DEFAULT '{}',
    allowed_cidrs   cidr[],                      -- NULL: any address
    rate_limit      text,                        -- per-key override such as 100/1m
    expires_at      timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    last_used_at    timestamptz,
    revoked_at      timestamptz,
    rotated_to      text REFERENCES api_keys(id)
);
CREATE INDEX api_keys_user_idx ON api_keys (user_id);

CREATE TABLE audit_events (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    type        text NOT NULL,
    actor       text,
    org_id      text,
    user_id     text,
    key_id      text,
    ip          inet,
    count       integer NOT NULL DEFAULT 1,  -- aggregated auth.failed rows stand for this many events
    detail      jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_events_at_idx ON audit_events (at);
CREATE INDEX audit_events_org_idx ON audit_events (org_id, at);
CREATE INDEX audit_events_key_idx ON audit_events (key_id, at);
