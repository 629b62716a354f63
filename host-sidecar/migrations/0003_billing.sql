-- Plans, subscriptions, billing events, shared pools and alerts (issue 7).

-- Bumped on every change to an account, its plan, limits or keys; mirrored into the account's
-- Redis state so every sidecar re-reads a changed account on its next request.
ALTER TABLE accounts ADD COLUMN version BIGINT NOT NULL DEFAULT 1;

-- An account's subscription: the plan it pays for, its status and current period. The account's
-- effective plan (accounts.plan) follows it: the subscribed plan while entitled, else the
-- configured fallback plan.
CREATE TABLE subscriptions (
    account_id    TEXT PRIMARY KEY REFERENCES accounts (id),
    plan          TEXT NOT NULL,
    status        TEXT NOT NULL,   -- active | trialing | past_due | canceled | expired
    provider      TEXT NOT NULL,   -- api | stripe | revenuecat
    subject       TEXT,            -- the provider's subscription / transaction id
    period_start  BIGINT NOT NULL, -- unix ms
    period_end    BIGINT NOT NULL,
    event_at      BIGINT NOT NULL, -- when the newest applied change happened (orders events)
    updated_at    BIGINT NOT NULL
);

-- Every billing-provider event received, once per (provider, event id): what we did with it.
CREATE TABLE billing_events (
    provider     TEXT NOT NULL,
    event_id     TEXT NOT NULL,
    kind         TEXT NOT NULL,
    account_id   TEXT,
    event_at     BIGINT NOT NULL,
    outcome      TEXT NOT NULL,    -- applied | stale | ignored | unknown | unmapped
    detail       TEXT NOT NULL DEFAULT '',
    received_at  BIGINT NOT NULL,
    PRIMARY KEY (provider, event_id)
);

-- Shared pools: a stock many accounts claim from, once each (coupon stock, free-trial pool).
-- Claims are ledger entries of the pool's pseudo-account `pool:<id>`.
CREATE TABLE pools (
    id          TEXT PRIMARY KEY,
    stock       BIGINT NOT NULL CHECK (stock >= 0),
    description TEXT NOT NULL DEFAULT '',
    created_at  BIGINT NOT NULL
);

-- Threshold alerts, once per account, scope, meter, window period and level.
CREATE TABLE alerts (
    account_id   TEXT NOT NULL,
    scope        TEXT NOT NULL,
    meter        TEXT NOT NULL,
    period       TEXT NOT NULL,
    level        INT NOT NULL,     -- percent of the limit: 80, 95, 100, ...
    name         TEXT NOT NULL,    -- the limit's name, e.g. account:tokens:day
    used         BIGINT NOT NULL,
    max          BIGINT NOT NULL,
    at           BIGINT NOT NULL,
    delivered_at BIGINT,
    attempts     INT NOT NULL DEFAULT 0,
    last_error   TEXT,
    PRIMARY KEY (account_id, scope, meter, period, level)
);
CREATE INDEX alerts_undelivered ON alerts (at) WHERE delivered_at IS NULL;
