-- As migrations/0008_parent.sql.
ALTER TABLE accounts ADD COLUMN parent TEXT REFERENCES accounts (id);
