-- The caller's correlation id (a client-chosen x-request-id, printable ASCII, at most 128
-- bytes) on the ledger entries of the request: its hold or consume, and the hold's commit,
-- release or expiry. NULL when the request had none. Not part of the idempotency key.
ALTER TABLE ledger ADD COLUMN correlation_id TEXT;
