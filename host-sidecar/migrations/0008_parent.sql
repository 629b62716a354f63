-- Hierarchy (organization > team > account): an account's parent, set when it is created and
-- never changed (every account of a tree keeps its Redis state in the root's shard). NULL for a
-- root.
ALTER TABLE accounts ADD COLUMN parent TEXT REFERENCES accounts (id);
-- Whether the account's spending may draw on its parent's credit once its own is spent (and, if
-- the parent draws on its own parent, on that one's too). Set at creation, like the parent.
ALTER TABLE accounts ADD COLUMN draw_from_parents BOOLEAN NOT NULL DEFAULT FALSE;
