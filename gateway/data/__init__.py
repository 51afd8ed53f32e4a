"""The data layer: the only code that speaks SQL.

`db.Database` is the way to a pooled connection (a deadline per call, outages mapped to StoreUnavailable;
only the invalidation listener's LISTEN connection and `gateway migrate` connect otherwise);
each other module holds the statements of one table family and returns typed rows (frozen dataclasses):
`keys` (api_keys, key_org_blocks), `orgs` (orgs, memberships, projects), `users` (people and service
accounts), `invitations`, `audit` (audit_events) and `schema` (migrations). The functions take the
connection of the caller's call, so a caller decides what shares one transaction."""
