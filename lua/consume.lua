-- consume: a one-shot charge of several meters and credit at once (batch consume), all or
-- nothing. Like authorize followed by commit at the same amounts, in one step and one event.
--
-- KEYS[1] account state hash      KEYS[2] outbox stream
-- KEYS[3], KEYS[4] tombstone buckets (current, previous): see tomb_get in lib.lua; the consume
--   is recorded there (status n) for the replay window, and answered from the ledger after it
-- KEYS[5] grant order zset        KEYS[6] grant remaining hash
-- KEYS[7..] one usage counter per limit, then the levels above (levels_cold in lib.lua)
-- ARGV: see spend_req in lib.lua (request fields, meters and resource as JSON, then limits,
--   the account version and the correlation id as JSON or ""; the id goes on the event only)
-- Returns {kind, json}: ok {credits, balance, limit, used, over, shadow} | replay ({credits}) | deny | conflict | cold | recheck | stale
local req = spend_req()
local recheck_until, ver = account_state(KEYS[1])
if recheck_until == nil or levels_cold(7 + #req.lims) then return reply('cold') end
if ver > req.ver then return reply('stale') end

local t = tomb_get(3, req.tomb)
if t then
  if t.status ~= 'consumed' or t.afp ~= fp16(req.fp) then return reply('conflict') end
  return reply('replay', '{"credits":' .. req.credit_s .. '}')
end
if recheck_until > req.now and not req.checked then return reply('recheck') end

local denied, a, b, shadow = eval_limits(req.lims, 7, req.now)
if denied then return deny('limit', denied, denied.max - a, req.credit_s) end
local balance, ws = nil, nil
if req.credit > 0 then
  ws = wallets(KEYS[5], KEYS[6], 7 + #req.lims)
  balance = read_wallets(ws, req.now)
  if balance < req.credit then return deny('credits', a, b, req.credit_s, balance) end
end

local uj, _, usedj, overj = charge_counters(req.lims, 7, req.now, req.idem)
local g, x = {}, {}
if req.credit > 0 then
  expire_wallets(ws, x)
  draw_wallets(ws, req.credit, g)
  balance = balance - req.credit
end
local res = '{"credits":' .. req.credit_s .. fr('balance', balance) .. fr('limit', limit_state(a, b)) .. fr('used', usedj) ..
  fr('over', overj) .. fr('shadow', shadow) .. '}'
tomb_put(3, req.tomb, req.tomb_ttl_ms, 'consumed', req.fp, '', req.credit_s, '', '')
emit(KEYS[2], '{"t":"consume","acct":"' .. req.acct .. '"' .. fs('key', req.key) .. ',"idem":"' .. req.idem ..
  '","fp":"' .. req.fp .. '","at":' .. req.now_s .. ',"credit":' .. req.credit_s .. ',"meters":' .. req.meters ..
  ',"route":"' .. req.route .. '"' .. fs('model', req.model) .. fr('resource', req.resource) .. fr('cid', req.cid) .. fr('u', uj) ..
  fr('g', rows_json(g)) .. fr('x', rows_json(x)) .. ',"result":' .. res .. '}')
return reply('ok', res)
