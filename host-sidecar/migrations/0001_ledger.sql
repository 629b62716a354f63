-- Tollgate's durable state. Redis is the real-time truth; this is the ledger it is rebuilt from.
-- Written only by the sync worker (from the outbox streams) and the admin API (accounts, keys).

CREATE TABLE accounts (
    id                 TEXT PRIMARY KEY,
    plan               TEXT NOT NULL,
    timezone           TEXT NOT NULL DEFAULT 'UTC',
    billing_anchor_day SMALLINT NOT NULL DEFAULT 1 CHECK (billing_anchor_day BETWEEN 1 AND 28),
    limits             JSONB NOT NULL DEFAULT '[]',   -- overrides of the plan's limits
    disabled           BOOLEAN NOT NULL DEFAULT FALSE,
    created_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at         TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    account_id  TEXT NOT NULL REFERENCES accounts (id),
    key_hash    BYTEA NOT NULL UNIQUE,                -- sha256(pepper || key); the key is never stored
    masked      TEXT NOT NULL,                        -- tg_1a2b…9f3c
    name        TEXT NOT NULL DEFAULT '',
    limits      JSONB NOT NULL DEFAULT '[]',          -- at or below the account's
    disabled    BOOLEAN NOT NULL DEFAULT FALSE,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX api_keys_account ON api_keys (account_id);

-- One immutable row per change, in outbox order. event_id = <stream epoch>:<stream entry id>.
CREATE TABLE ledger (
    seq         BIGSERIAL PRIMARY KEY,
    event_id    TEXT NOT NULL UNIQUE,
    shard       INT NOT NULL,
    account_id  TEXT NOT NULL,
    key_id      TEXT,
    kind        TEXT NOT NULL,   -- hold | commit | release | expire | consume | grant
    idem_key    TEXT,            -- the request id / grant id that caused it
    hold_id     TEXT,
    fp          TEXT,            -- fingerprint of the request, to answer replays
    credit      BIGINT NOT NULL DEFAULT 0,
    shortfall   BIGINT NOT NULL DEFAULT 0,
    meters      JSONB,
    usage       JSONB,           -- [[scope, meter, period, delta, period_end_ms]]
    grants      JSONB,           -- [[grant id, remaining delta]]
    expired     JSONB,           -- [[grant id, amount expired]]
    route       TEXT,
    model       TEXT,
    resource    JSONB,
    result      JSONB NOT NULL,
    at          TIMESTAMPTZ NOT NULL,
    synced_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX ledger_account ON ledger (account_id, seq);
CREATE INDEX ledger_idempotency ON ledger (account_id, idem_key) WHERE idem_key IS NOT NULL;

-- Used amount (committed + held) per scope, meter and period: what a cold load restores.
CREATE TABLE usage (
    account_id  TEXT NOT NULL,
    scope       TEXT NOT NULL,   -- a:<account> | k:<key id>
    meter       TEXT NOT NULL,
    period      TEXT NOT NULL,   -- d:2026-11-22, m:2026-11, l, ...
    used        BIGINT NOT NULL,
    period_end  BIGINT NOT NULL, -- unix ms; 0 = lifetime
    PRIMARY KEY (account_id, scope, meter, period)
);

CREATE TABLE grants (
    account_id  TEXT NOT NULL,
    id          TEXT NOT NULL,
    member      TEXT NOT NULL,   -- spending-order key, as in Redis
    amount      BIGINT NOT NULL CHECK (amount > 0),
    remaining   BIGINT NOT NULL CHECK (remaining >= 0),
    expired     BIGINT NOT NULL DEFAULT 0,
    priority    INT NOT NULL,
    expires_at  BIGINT,          -- unix ms
    source      TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (account_id, id)
);

CREATE TABLE holds (
    account_id  TEXT NOT NULL,
    id          TEXT NOT NULL,   -- <account>/<request id>
    key_id      TEXT,
    status      TEXT NOT NULL,   -- open | committed | released | expired
    credit      BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    record      JSONB NOT NULL,  -- the Redis hold record, to restore open holds
    fp          TEXT NOT NULL,   -- fingerprint of the authorize request
    auth_result JSONB NOT NULL,  -- the authorize answer, to answer replays
    result      JSONB,           -- the settlement, to answer replays
    settle_fp   TEXT,
    created_at  BIGINT NOT NULL,
    resolved_at BIGINT,
    PRIMARY KEY (account_id, id)
);
CREATE INDEX holds_open ON holds (account_id) WHERE status = 'open';

-- How far each shard's outbox has been applied; updated in the same transaction as the rows.
CREATE TABLE sync_cursor (
    prefix      TEXT NOT NULL,
    shard       INT NOT NULL,
    epoch       TEXT NOT NULL,
    last_id     TEXT NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (prefix, shard)
);
