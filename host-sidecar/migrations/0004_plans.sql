-- Plans written through the admin API. A plan here overrides the configuration's plan of the
-- same name; `body` is the plan as JSON (limits, included credits and their period, expiry and
-- priority, as in the configuration's [plans.NAME]).
CREATE TABLE plans (
    name        TEXT PRIMARY KEY,
    body        JSONB NOT NULL,
    version     BIGINT NOT NULL DEFAULT 1,  -- bumped on every write
    updated_at  BIGINT NOT NULL
);
