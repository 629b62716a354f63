-- How many times a decision from PostgreSQL changed the row's account or hold. The hand-back
-- deletes a row only at the count it read, so a change made while it ran is not forgotten.
ALTER TABLE degraded_changes ADD COLUMN n BIGINT NOT NULL DEFAULT 0;
