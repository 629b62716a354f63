-- release: cancel an open hold; every counter and all held credit are returned. The sweeper
-- uses the same script with status `expired` for holds past their expiry. Status `cancelled`
-- (the filter gave up on a decision it may never hear back about: its deadline passed, or the
-- client left) releases the hold if it was made, and otherwise leaves a tombstone under its
-- key for the replay window, so an authorize still on its way is refused (`conflict`)
-- instead of holding for nobody until the sweeper.
--
-- KEYS[1] account state hash   KEYS[2] outbox stream   KEYS[3] hold record (hash)
-- KEYS[4] open holds zset      KEYS[5] grant order     KEYS[6] grant remaining
-- KEYS[7], KEYS[8] tombstone buckets (current, previous): see tomb_get in lib.lua
-- ARGV: see settle_req in lib.lua, then `released` (caller), `expired` (sweeper) or
--   `cancelled` (the filter, by its decision key)
-- (The event carries the hold's correlation id, if any, from the hold record.)
-- Returns {kind, json}: ok {hold, status, credits: 0, ...} | replay | resolved {status} | gone | cold
local req = settle_req()
local status = ARGV[req.next]
if status ~= 'released' and status ~= 'expired' and status ~= 'cancelled' then
  return redis.error_reply('bad status')
end
if status == 'cancelled' then
  if account_state(KEYS[1]) == nil or levels_cold(9) then return reply('cold') end
  if redis.call('EXISTS', KEYS[3]) == 0 and tomb_get(7, req.tomb) == nil then
    tomb_put(7, req.tomb, req.tomb_ttl_ms, 'cancelled', 'cancelled', 'release', 0, 0, 0)
    return reply('ok', '{"hold":"' .. req.hold .. '","status":"cancelled","credits":0}')
  end
  status = 'released'
end
if status == 'expired' then
  -- The sweeper races with commits: only expire what is really past its expiry.
  local rec = redis.call('HMGET', KEYS[3], 's', 'd')
  if rec[1] == 'open' and cjson.decode(rec[2]).exp > req.now then
    return reply('resolved', jobj({'status', 'open'}))
  end
end
return settle_hold(req, status)
