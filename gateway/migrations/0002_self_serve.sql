-- Self-serve management: service accounts (non-human members of one org) and richer audit rows.
ALTER TABLE users ADD COLUMN kind text NOT NULL DEFAULT 'human' CHECK (kind IN ('human', 'service'));
ALTER TABLE users ADD COLUMN name text;
ALTER TABLE users ADD COLUMN service_org text REFERENCES orgs(id) ON DELETE CASCADE;
ALTER TABLE users ALTER COLUMN email DROP NOT NULL;
ALTER TABLE users ADD CONSTRAINT users_service_org CHECK ((kind = 'service') = (service_org IS NOT NULL));

ALTER TABLE audit_events ADD COLUMN target text;
ALTER TABLE audit_events ADD COLUMN user_agent text;

CREATE INDEX api_keys_created_idx ON api_keys (created_at, id);
CREATE INDEX audit_events_org_id_idx ON audit_events (org_id, id);
