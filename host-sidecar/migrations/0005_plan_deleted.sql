-- A plan deleted through the admin API stays as a tombstone: its version keeps counting, so a
-- sidecar that still has the old plan in memory can tell that what it has is older, and a plan
-- written again under the same name gets a version above every one it had before.
ALTER TABLE plans ADD COLUMN deleted BOOLEAN NOT NULL DEFAULT FALSE;
