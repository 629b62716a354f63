-- Hierarchy (organization > team > account): an account's parent, set when it is created and
-- never changed (every account of a tree keeps its Redis state in the root's shard). NULL for a
-- root.
ALTER TABLE accounts ADD COLUMN parent TEXT REFERENCES accounts (id);
