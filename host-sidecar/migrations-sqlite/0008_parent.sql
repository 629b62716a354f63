-- As migrations/0008_parent.sql.
ALTER TABLE accounts ADD COLUMN parent TEXT REFERENCES accounts (id);
ALTER TABLE accounts ADD COLUMN draw_from_parents BOOLEAN NOT NULL DEFAULT FALSE;
