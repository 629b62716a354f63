-- commit: settle an open hold with the actual amounts. Counters move by (actual - estimate);
-- credit held beyond the actual cost is returned to its grants (last drawn first), and credit
-- beyond the estimate is drawn now. The balance never goes below zero: what cannot be drawn is
-- reported as `shortfall`. A hold resolves once: commit after release/expiry is refused.
--
-- KEYS[1] account state hash   KEYS[2] outbox stream   KEYS[3] hold record (hash)
-- KEYS[4] open holds zset      KEYS[5] grant order     KEYS[6] grant remaining
-- KEYS[7], KEYS[8] tombstone buckets (current, previous): see tomb_get in lib.lua
-- (The hold's usage counters are named in the hold record; they share the hash tag. Its
-- correlation id, if any, is taken from the record onto the commit event.)
-- ARGV: see settle_req in lib.lua (now, hold id, fingerprint, credit, tombstone ttl and field,
--   meters), then how the route and model are known (see below)
-- Returns {kind, json}: ok {hold, status, credits, shortfall, meters, grew: [[name, scope, meter,
--   period, max, used], ...] (limits taken past their estimate, for alerts)} | replay (same) |
--   resolved {status} (already settled otherwise) | gone (no such hold in Redis) | cold |
--   conflict {route, model} (the hold's: the commit was priced with others; nothing changed)
local req = settle_req()
-- ARGV[req.next]: absent (the sidecar read the hold's route and model itself), `check` then the
-- route and model ('' for none) the commit was priced with, to be checked against the hold's, or
-- `replay` (the sidecar could not price it: only a repeat of a settled commit is answered).
local mode = ARGV[req.next]
if mode == 'check' then
  req.route = ARGV[req.next + 1]
  req.model = ARGV[req.next + 2] or ''
elseif mode == 'replay' then
  req.replay_only = true
end
return settle_hold(req, 'committed')
