-- grant: add credit to an account (purchase, promotion, refund, plan allowance, adjustment), with
-- a priority (lower spends first) and an optional expiry. The grant id is the idempotency key.
--
-- KEYS[1] account state hash   KEYS[2] outbox stream
-- KEYS[3] grant order zset     KEYS[4] grant remaining hash
-- KEYS[5] idempotency record   tg:{s}:i:<acct>:grant:<grant id>
-- ARGV[1] JSON {now, acct, gid, amount, priority, expires (ms, 0 = never), source, fp, idem_ttl_ms}
-- Returns {kind, json}: ok {grant_id, amount, balance} | replay | conflict | cold | recheck
local req = cjson.decode(ARGV[1])
local recheck_until = account_state(KEYS[1])
if recheck_until == nil then return reply('cold') end
local prev = redis.call('GET', KEYS[5])
if prev then
  local p = cjson.decode(prev)
  if p.fp ~= req.fp then return reply('conflict') end
  return reply('replay', p.res)
end
if recheck_until > req.now and not req.checked then return reply('recheck') end

local expires = req.expires
if expires == 0 then expires = NO_EXPIRY end
local member = grant_member(req.priority, expires, req.now, req.gid)
local x = {}
if expires > req.now then
  redis.call('HINCRBY', KEYS[4], req.gid, req.amount)
  redis.call('ZADD', KEYS[3], 0, member)
else
  x[1] = {req.gid, req.amount}
end
local balance = read_grants(KEYS[3], KEYS[4], req.now)
local res = {grant_id = req.gid, amount = req.amount, balance = balance}
redis.call('SET', KEYS[5], cjson.encode({fp = req.fp, res = res}), 'PX', req.idem_ttl_ms)
emit(KEYS[2], {t = 'grant', acct = req.acct, idem = req.gid, fp = req.fp, at = req.now, credit = req.amount,
  grant = {id = req.gid, member = member, amount = req.amount, priority = req.priority,
    expires = req.expires, source = req.source},
  g = {{req.gid, req.amount}}, x = x, result = res})
return reply('ok', res)
