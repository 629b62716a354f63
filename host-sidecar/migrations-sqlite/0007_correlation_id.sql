-- As migrations/0007_correlation_id.sql.
ALTER TABLE ledger ADD COLUMN correlation_id TEXT;
