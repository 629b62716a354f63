#!lua flags=no-writes
-- check: the same evaluation as authorize (every limit and the credit balance) with no change
-- (a pre-check). Expired grants are left for the next mutating script to record.
--
-- KEYS[1] account state hash, KEYS[2] grant order zset, KEYS[3] grant remaining hash,
-- KEYS[4..] one usage counter per limit, then the levels above (levels_cold in lib.lua)
-- ARGV as for authorize (see spend_req in lib.lua; the correlation id is ignored)
-- Returns {kind, json}: ok {credits, balance, limit, shadow} | deny {reason, limit, credits, balance} | cold | stale
local req = spend_req()
local loaded, ver = account_state(KEYS[1])
if loaded == nil or levels_cold(4 + #req.lims) then return reply('cold') end
if ver > req.ver then return reply('stale') end
local denied, a, b, shadow = eval_limits(req.lims, 4, req.now, true)
if denied then return deny('limit', denied, denied.max - a, req.credit_s) end
local balance = read_wallets(wallets(KEYS[2], KEYS[3], 4 + #req.lims), req.now)
if balance < req.credit then return deny('credits', a, b, req.credit_s, balance) end
return reply('ok', '{"credits":' .. req.credit_s .. ',"balance":' .. (balance - req.credit) ..
  fr('limit', limit_state(a, b)) .. fr('shadow', shadow) .. '}')
