-- Adding an existing user to an org through the API is an invitation the user accepts (or declines).
CREATE TABLE invitations (
    id          text PRIMARY KEY,
    org_id      text NOT NULL REFERENCES orgs(id) ON DELETE CASCADE,
    user_id     text NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    role        text NOT NULL,
    invited_by  text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    state       text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'accepted', 'declined', 'revoked', 'expired')),
    decided_at  timestamptz
);
-- One open invitation per user and org: inviting again renews it.
CREATE UNIQUE INDEX invitations_pending_idx ON invitations (org_id, user_id) WHERE state = 'pending';
CREATE INDEX invitations_user_idx ON invitations (user_id);

-- A key stopped in one org by that org's admins: it keeps acting in its owner's other orgs.
CREATE TABLE key_org_blocks (
    key_id      text NOT NULL REFERENCES api_keys(id) ON DELETE CASCADE,
    org_id      text NOT NULL REFERENCES orgs(id) ON DELETE CASCADE,
    blocked_at  timestamptz NOT NULL DEFAULT now(),
    blocked_by  text,
    PRIMARY KEY (key_id, org_id)
);
