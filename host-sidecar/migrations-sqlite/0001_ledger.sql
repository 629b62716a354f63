-- The embedded ledger (SQLite): the same tables as migrations/0001_ledger.sql for PostgreSQL,
-- with JSON kept as text and every time as unix milliseconds. Read that file for what each
-- column means; keep the two in step (the conformance suite runs against both).

CREATE TABLE accounts (
    id                 TEXT PRIMARY KEY,
    plan               TEXT NOT NULL,
    timezone           TEXT NOT NULL DEFAULT 'UTC',
    billing_anchor_day INTEGER NOT NULL DEFAULT 1 CHECK (billing_anchor_day BETWEEN 1 AND 28),
    limits             TEXT NOT NULL DEFAULT '[]',
    disabled           BOOLEAN NOT NULL DEFAULT FALSE,
    created_at         TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at         TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
);

CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    account_id  TEXT NOT NULL REFERENCES accounts (id),
    key_hash    BLOB NOT NULL UNIQUE,
    masked      TEXT NOT NULL,
    name        TEXT NOT NULL DEFAULT '',
    limits      TEXT NOT NULL DEFAULT '[]',
    disabled    BOOLEAN NOT NULL DEFAULT FALSE,
    created_at  TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE INDEX api_keys_account ON api_keys (account_id);

CREATE TABLE ledger (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id    TEXT NOT NULL UNIQUE,
    shard       INTEGER NOT NULL,
    account_id  TEXT NOT NULL,
    key_id      TEXT,
    kind        TEXT NOT NULL,
    idem_key    TEXT,
    hold_id     TEXT,
    fp          TEXT,
    credit      INTEGER NOT NULL DEFAULT 0,
    shortfall   INTEGER NOT NULL DEFAULT 0,
    meters      TEXT,
    usage       TEXT,
    grants      TEXT,
    expired     TEXT,
    route       TEXT,
    model       TEXT,
    resource    TEXT,
    result      TEXT NOT NULL,
    at          INTEGER NOT NULL,   -- unix ms
    synced_at   TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE INDEX ledger_account ON ledger (account_id, seq);
CREATE INDEX ledger_idempotency ON ledger (account_id, idem_key) WHERE idem_key IS NOT NULL;

CREATE TABLE usage (
    account_id  TEXT NOT NULL,
    scope       TEXT NOT NULL,
    meter       TEXT NOT NULL,
    period      TEXT NOT NULL,
    used        INTEGER NOT NULL,
    period_end  INTEGER NOT NULL,
    PRIMARY KEY (account_id, scope, meter, period)
);

CREATE TABLE grants (
    account_id  TEXT NOT NULL,
    id          TEXT NOT NULL,
    member      TEXT NOT NULL,
    amount      INTEGER NOT NULL CHECK (amount > 0),
    remaining   INTEGER NOT NULL CHECK (remaining >= 0),
    expired     INTEGER NOT NULL DEFAULT 0,
    priority    INTEGER NOT NULL,
    expires_at  INTEGER,
    source      TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (account_id, id)
);

CREATE TABLE holds (
    account_id  TEXT NOT NULL,
    id          TEXT NOT NULL,
    key_id      TEXT,
    status      TEXT NOT NULL,
    credit      INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    record      TEXT NOT NULL,
    fp          TEXT NOT NULL,
    auth_result TEXT NOT NULL,
    result      TEXT,
    settle_fp   TEXT,
    created_at  INTEGER NOT NULL,
    resolved_at INTEGER,
    PRIMARY KEY (account_id, id)
);
CREATE INDEX holds_open ON holds (account_id) WHERE status = 'open';

CREATE TABLE sync_cursor (
    prefix      TEXT NOT NULL,
    shard       INTEGER NOT NULL,
    epoch       TEXT NOT NULL,
    last_id     TEXT NOT NULL,
    updated_at  TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (prefix, shard)
);
