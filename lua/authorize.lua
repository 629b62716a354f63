-- authorize: check every limit of the request's account and key and the credit balance; if all
-- admit it, hold the estimated amounts — all or nothing.
--
-- KEYS[1] account state hash      tg:{s}:a:<acct>
-- KEYS[2] outbox stream           tg:{s}:outbox
-- KEYS[3] hold record (hash)      tg:{s}:h:<acct>/<request id>   (also the idempotency record)
-- KEYS[4] open holds by expiry    tg:{s}:holds                   (zset, member = hold id)
-- KEYS[5] grant order             tg:{s}:a:<acct>:go             (lex zset)
-- KEYS[6] grant remaining         tg:{s}:a:<acct>:gr             (hash gid -> remaining)
-- KEYS[7], KEYS[8] tombstone buckets (current, previous): see tomb_get in lib.lua
-- KEYS[9..] one usage counter per limit, in the order of lims, then the state hashes of the
--   levels above the account (see levels_cold in lib.lua)
-- ARGV: see spend_req in lib.lua (request fields, meters and resource as JSON, then limits,
--   the account version and the correlation id as JSON or ""; the id goes on the hold record
--   and the event, not into the fingerprint)
-- Returns {kind, json}:
--   ok       {hold, exp, credits, balance, limit, used, over, shadow}   the hold was created
--            (used: per limit; over: soft limits past their max; shadow: limits that would
--            have refused it — see eval_limits and charge_counters in lib.lua)
--   replay   the first ok, unchanged                this request id already holds
--            (once the hold is settled: {hold, exp, credits} from its tombstone)
--   deny     {reason: limit|credits, limit, credits, balance}
--   conflict ""   the request id was used with a different request
--   cold     ""   account state not in Redis: load it from the ledger and retry
--   stale    ""   the account changed (plan, limits, keys) since the sidecar read it: re-read, retry
--   recheck  ""   just after a cold load: ask PostgreSQL whether this request id was used
local req = spend_req()
local recheck_until, ver = account_state(KEYS[1])
if recheck_until == nil or levels_cold(9 + #req.lims) then return reply('cold') end
if ver > req.ver then return reply('stale') end

local prev = redis.call('HMGET', KEYS[3], 'f', 'a')
if prev[1] then
  if prev[1] ~= req.fp then return reply('conflict') end
  return reply('replay', prev[2])
end
local t = tomb_get(7, req.tomb)
if t then
  if t.status == 'cancelled' or t.afp ~= fp16(req.fp) then return reply('conflict') end
  return reply('replay', '{"hold":"' .. req.hold .. '","exp":' .. t.exp .. ',"credits":' .. req.credit_s .. '}')
end
if recheck_until > req.now and not req.checked then return reply('recheck') end

local denied, a, b, shadow = eval_limits(req.lims, 9, req.now)
if denied then return deny('limit', denied, denied.max - a, req.credit_s) end
local tight, tight_rem = a, b

local balance, ws = nil, nil
if req.credit > 0 then
  ws = wallets(KEYS[5], KEYS[6], 9 + #req.lims)
  balance = read_wallets(ws, req.now)
  if balance < req.credit then return deny('credits', tight, tight_rem, req.credit_s, balance) end
end

-- Admitted: charge counters, draw credit, record the hold.
local uj, cj, usedj, overj = charge_counters(req.lims, 9, req.now, req.hold)
local g, x, draws = {}, {}, {}
if req.credit > 0 then
  expire_wallets(ws, x)
  draws = draw_wallets(ws, req.credit, g)
  balance = balance - req.credit
end

local res = '{"hold":"' .. req.hold .. '","exp":' .. req.exp_s .. ',"credits":' .. req.credit_s ..
  fr('balance', balance) .. fr('limit', limit_state(tight, tight_rem)) .. fr('used', usedj) ..
  fr('over', overj) .. fr('shadow', shadow) .. '}'
local rec = '{"acct":"' .. req.acct .. '"' .. fs('key', req.key) .. ',"exp":' .. req.exp_s ..
  ',"credit":' .. req.credit_s .. fr('draws', rows_json(draws)) .. fr('ctr', cj) .. ',"meters":' ..
  req.meters .. ',"route":"' .. req.route .. '"' .. fs('model', req.model) .. ',"at":' .. req.now_s ..
  ',"fp":"' .. req.fp .. '"' .. fr('cid', req.cid) .. '}'
redis.call('HSET', KEYS[3], 's', 'open', 'f', req.fp, 'a', res, 'd', rec)
redis.call('ZADD', KEYS[4], req.exp_s, req.hold)
emit(KEYS[2], '{"t":"hold","acct":"' .. req.acct .. '"' .. fs('key', req.key) .. ',"hold":"' .. req.hold ..
  '","idem":"' .. req.idem .. '","fp":"' .. req.fp .. '","at":' .. req.now_s .. ',"credit":' .. req.credit_s ..
  ',"meters":' .. req.meters .. ',"route":"' .. req.route .. '"' .. fs('model', req.model) ..
  fr('resource', req.resource) .. fr('cid', req.cid) .. fr('u', uj) .. fr('g', rows_json(g)) .. fr('x', rows_json(x)) ..
  ',"rec":' .. rec .. ',"result":' .. res .. '}')
return reply('ok', res)
