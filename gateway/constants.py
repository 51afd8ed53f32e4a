"""Every Redis key name, channel and default duration, in one place.

Key templates put the key id in a Cluster hash tag (`{...}`) so that a key's cache entry and its
generation counter live in one slot: a conditional cache fill is then one Lua call on Redis Cluster.
"""

from typing import Final

REDIS_PREFIX: Final = "gw"

# Positive cache entry of a verified key, by key id (hash tag) and HMAC digest of the whole key.
REDIS_KEY_ENTRY: Final = REDIS_PREFIX + ":key:{{{key_id}}}:{digest}"
# Bumped on every invalidation of a key; a cache fill only lands when it is unchanged.
REDIS_KEY_GENERATION: Final = REDIS_PREFIX + ":gen:{{{key_id}}}"
# The digests cached for a key id, so invalidation can delete them.
REDIS_KEY_INDEX: Final = REDIS_PREFIX + ":idx:{{{key_id}}}"
# Negative entries (unknown key id, wrong secret): apart from positive ones, short-lived.
REDIS_NEGATIVE_ENTRY: Final = REDIS_PREFIX + ":neg:{{{key_id}}}:{digest}"

# GCRA state (theoretical arrival time) of one rate limit for one identity (address, key id, org id, or
# `<key id>:<address>` for failures_per_key_address). Public identifiers only, never key material.
REDIS_RATE_LIMIT: Final = REDIS_PREFIX + ":rl:{{{name}:{ident}}}"

# Addresses a key recently verified from: they keep working while its key id is under attack.
REDIS_GOOD_ADDRESSES: Final = REDIS_PREFIX + ":ok:{{{key_id}}}"
GOOD_ADDRESS_TTL_S: Final = 86_400
# An invitation to an org not accepted within this time lapses.
INVITATION_TTL_S: Final = 7 * 86_400

# Why a negative entry refuses a key (stored as its value; never shown to clients, who get invalid_api_key).
NEGATIVE_UNKNOWN_KEY: Final = "unknown_key"  # no key has this id
NEGATIVE_WRONG_SECRET: Final = "wrong_secret"  # noqa: S105 - a reason, not a secret: the key exists, this is not its secret

# A browser session (a hash), by SHA-256 of its cookie (the cookie itself is never stored). (`sess` held
# JSON text: a new name, not WRONGTYPE; sessions of before simply end.)
REDIS_SESSION: Final = REDIS_PREFIX + ":session:{digest}"
# The sessions of one user (a sorted set, scored by creation time), so signing out ends all of them and
# a user holds at most `sessions.max_per_user`. (`usess` was a plain set: a new name, not WRONGTYPE.)
REDIS_USER_SESSIONS: Final = REDIS_PREFIX + ":usessz:{user_id}"

# Postgres LISTEN/NOTIFY channel: sent inside the transaction that changes access, so an
# invalidation is delivered exactly when (and only if) the change commits.
PG_INVALIDATION_CHANNEL: Final = "gateway_invalidate"
# pg_notify payloads are limited to 8000 bytes; key ids are batched below that.
PG_NOTIFY_BATCH: Final = 200
# pg_advisory_lock id that serialises `gateway migrate` across replicas.
MIGRATION_LOCK_ID: Final = 0x6761_7465_7761_79

# The most two replicas' wall clocks may differ: a Redis entry read less than this after an invalidation
# of its key reached a process is not used there (read again from Postgres), should Redis have lost that
# invalidation (see LocalCache.shared_trusts).
CLOCK_SKEW_S: Final = 1.0

DEFAULT_LOCAL_TTL_S: Final = 30.0
DEFAULT_REDIS_TTL_S: Final = 300.0
DEFAULT_NEGATIVE_TTL_S: Final = 10.0
DEFAULT_STALE_IF_ERROR_S: Final = 300.0
DEFAULT_LOCAL_MAX_ENTRIES: Final = 100_000
DEFAULT_REDIS_TIMEOUT_MS: Final = 50
DEFAULT_DB_TIMEOUT_MS: Final = 2000
# A management call's database work, from waiting for a connection to the commit (a new key's argon2
# hash included): past it the call answers 503 and its connection is closed, never left hanging.
DEFAULT_MANAGEMENT_TIMEOUT_MS: Final = 10_000
DEFAULT_REDIS_MAX_CONNECTIONS: Final = 64
DEFAULT_DRAIN_S: Final = 5.0
# A request head must arrive within this long of its first byte, a body within this long of its head.
DEFAULT_HEADER_TIMEOUT_S: Final = 10.0
DEFAULT_BODY_TIMEOUT_S: Final = 10.0
# Rate-limit leases (see gateway/leases.py): how long a lease lives, and the most tokens one may hold.
LEASE_S: Final = 0.25
LEASE_BURST_FRACTION: Final = 0.1
LEASE_MAX_TOKENS: Final = 1000
# Route matches a policy remembers (by method, host and path) before it starts again.
POLICY_MATCH_MEMO: Final = 4096
# A circuit breaker skips a failed backend this long, then lets one call probe it.
BREAKER_COOLDOWN_S: Final = 0.5
# How often each process checks Postgres and Redis in the background (readiness body, metrics, recovery).
HEALTH_INTERVAL_S: Final = 1.0
# The invalidation listener pings its connection this often; a silent connection counts as lost.
LISTENER_PING_S: Final = 0.5
DEFAULT_LAST_USED_FLUSH_S: Final = 5.0
DEFAULT_AUDIT_FLUSH_S: Final = 1.0
DEFAULT_AUDIT_FAILED_MAX_PER_FLUSH: Final = 50
# The nice value of argon2 threads: the lowest priority, so hashing never takes the core from the event loop.
ARGON2_NICE: Final = 19
# argon2 verifications that may wait for a free `keys.verify_threads` thread; past it one is refused (503).
DEFAULT_VERIFY_QUEUE: Final = 64
# How long a client refused because every argon2 thread and queue slot was taken is asked to wait.
VERIFY_BUSY_RETRY_AFTER_S: Final = 1
ORIGINALS_MEMO: Final = 4096  # proxies' descriptions of original requests (and paths) a process remembers checked
MEMO_TEXT_MAX: Final = 1024  # longer texts are checked each time, never remembered (memory stays bounded)
IDENTITIES_PER_KEY: Final = 64  # (org, project) pairs whose identity a cached key keeps
CLIENT_ADDRESS_MEMO: Final = 4096  # peer and X-Forwarded-For texts a process remembers parsed

# JWT access tokens: the longest lifetime one may be given (a previous signing key stays published this
# long after a rotation, plus the leeway), and how often every process re-reads the signing keys anyway.
MAX_ACCESS_TTL_S: Final = 3600
SIGNING_KEYS_RELOAD_S: Final = 60.0
# A bearer token longer than this is refused unread.
MAX_TOKEN_LEN: Final = 4096
# Verified access tokens a process keeps (by digest), until each expires.
TOKEN_CACHE_MAX: Final = 100_000
# An unknown `kid` makes a process re-read the signing keys at most this often.
UNKNOWN_KID_RELOAD_S: Final = 5.0
# Keys whose api_key.used a process aggregates in one minute; uses of further keys are counted as dropped.
USAGE_MAX_KEYS: Final = 10_000
