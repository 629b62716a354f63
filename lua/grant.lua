-- grant: add credit to an account (purchase, promotion, refund, plan allowance, adjustment), with
-- a priority (lower spends first) and an optional expiry. The grant id is the idempotency key.
--
-- KEYS[1] account state hash   KEYS[2] outbox stream
-- KEYS[3] grant order zset     KEYS[4] grant remaining hash
-- KEYS[5] idempotency record   tg:{s}:i:<acct>:grant:<grant id>  (hash f, a)
-- ARGV[1] JSON {now, acct, gid, amount, priority, expires (ms, 0 = never), source, fp, checked,
--         idem_ttl_ms}
-- Returns {kind, json}: ok {grant_id, amount, balance} | replay | conflict | cold | recheck
local req = cjson.decode(ARGV[1])
local recheck_until = account_state(KEYS[1])
if recheck_until == nil then return reply('cold') end
local prev = redis.call('HMGET', KEYS[5], 'f', 'a')
if prev[1] then
  if prev[1] ~= req.fp then return reply('conflict') end
  return reply('replay', prev[2])
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
local res = jobj({'grant_id', req.gid, 'amount', req.amount, 'balance', balance})
redis.call('HSET', KEYS[5], 'f', req.fp, 'a', res)
redis.call('PEXPIRE', KEYS[5], req.idem_ttl_ms)
local grant = jobj({'id', req.gid, 'member', member, 'amount', req.amount, 'priority', req.priority,
  'expires', req.expires, 'source', req.source})
emit(KEYS[2], jobj({'t', 'grant', 'acct', req.acct, 'idem', req.gid, 'fp', req.fp, 'at', req.now,
  'credit', req.amount, 'grant', raw(grant), 'g', jrows({{req.gid, req.amount}}), 'x', jrows(x),
  'result', raw(res)}))
return reply('ok', res)
