-- As migrations/0002_degraded.sql (kept so both ledgers have the same tables; the embedded
-- store has no Redis to lose, so SQLite never fills it).
CREATE TABLE degraded_changes (
    prefix      TEXT NOT NULL,
    account_id  TEXT NOT NULL,
    hold_id     TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (prefix, account_id, hold_id)
);
