-- Accounts and holds changed by decisions made from PostgreSQL while Redis was unreachable.
-- When Redis is back, their Redis state is dropped (so it is rebuilt from the ledger) and the
-- rows are deleted. hold_id '' marks the account itself.
CREATE TABLE degraded_changes (
    prefix      TEXT NOT NULL,
    account_id  TEXT NOT NULL,
    hold_id     TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (prefix, account_id, hold_id)
);
