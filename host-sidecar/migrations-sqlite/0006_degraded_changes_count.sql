-- As migrations/0006_degraded_changes_count.sql.
ALTER TABLE degraded_changes ADD COLUMN n INTEGER NOT NULL DEFAULT 0;
