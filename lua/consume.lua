-- consume: a one-shot charge of several meters and credit at once (batch consume), all or
-- nothing. Like authorize followed by commit at the same amounts, in one step and one event.
--
-- KEYS[1] account state hash      KEYS[2] outbox stream
-- KEYS[3] idempotency record      tg:{s}:i:<acct>:consume:<idempotency key>  (hash f, a)
-- KEYS[4] grant order zset        KEYS[5] grant remaining hash
-- KEYS[6..] one usage counter per limit
-- ARGV: see spend_req in lib.lua (request fields, meters and resource as JSON, then limits,
--   the account version and the correlation id as JSON or ""; the id goes on the event only)
-- Returns {kind, json}: ok {credits, balance, limit} | replay (first ok) | deny | conflict | cold | recheck | stale
local req = spend_req()
local recheck_until, ver = account_state(KEYS[1])
if recheck_until == nil then return reply('cold') end
if ver > req.ver then return reply('stale') end

local prev = redis.call('HMGET', KEYS[3], 'f', 'a')
if prev[1] then
  if prev[1] ~= req.fp then return reply('conflict') end
  return reply('replay', prev[2])
end
if recheck_until > req.now and not req.checked then return reply('recheck') end

local denied, a, b = eval_limits(req.lims, 6)
if denied then return deny('limit', denied, denied.max - a, req.credit_s) end
local balance, live, expired = nil, nil, nil
if req.credit > 0 then
  balance, live, expired = read_grants(KEYS[4], KEYS[5], req.now)
  if balance < req.credit then return deny('credits', a, b, req.credit_s, balance) end
end

local uj, _, usedj = charge_counters(req.lims, 6, req.now)
local g, x = {}, {}
if req.credit > 0 then
  expire_grants(KEYS[4], KEYS[5], expired, x)
  draw(KEYS[4], KEYS[5], live, req.credit, g)
  balance = balance - req.credit
end
local res = '{"credits":' .. req.credit_s .. fr('balance', balance) .. fr('limit', limit_state(a, b)) .. fr('used', usedj) .. '}'
redis.call('HSET', KEYS[3], 'f', req.fp, 'a', res)
redis.call('PEXPIRE', KEYS[3], req.idem_ttl_ms)
emit(KEYS[2], '{"t":"consume","acct":"' .. req.acct .. '"' .. fs('key', req.key) .. ',"idem":"' .. req.idem ..
  '","fp":"' .. req.fp .. '","at":' .. req.now_s .. ',"credit":' .. req.credit_s .. ',"meters":' .. req.meters ..
  ',"route":"' .. req.route .. '"' .. fs('model', req.model) .. fr('resource', req.resource) .. fr('cid', req.cid) .. fr('u', uj) ..
  fr('g', rows_json(g)) .. fr('x', rows_json(x)) .. ',"result":' .. res .. '}')
return reply('ok', res)
