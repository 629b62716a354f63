-- load: install an account's state rebuilt from the ledger (cold load), unless it is already
-- there. Counters get the *used* amounts of the current windows and grants their *remaining*
-- amounts — never totals — so a lost Redis never resets anyone's usage. Only the first of
-- several concurrent loaders writes anything. (A parent's counters are loaded with the parent:
-- while its state is missing, no script of its tree touches them — see levels_cold in lib.lua.)
--
-- KEYS[1] account state hash   KEYS[2] grant order zset   KEYS[3] grant remaining hash
-- KEYS[4] open holds zset
-- (Counter and hold keys come in ARGV; they share the account's hash tag.)
-- ARGV[1] JSON {now, recheck_until, version, counters: [[key, used, end]], grants: [[gid, member,
--         remaining]], holds: [[hold key, hold id, record json, fingerprint, authorize answer
--         json, expires]]}
-- Returns {kind, json}: ok "" (loaded) | replay "" (already loaded; nothing written)
local req = cjson.decode(ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 1 then return reply('replay') end
redis.call('DEL', KEYS[2], KEYS[3])
for _, c in ipairs(req.counters or {}) do
  if c[3] > 0 then
    local ttl = counter_ttl(c[3], req.now)
    if ttl > 0 then redis.call('SET', c[1], c[2], 'PX', ttl) end
  else
    redis.call('SET', c[1], c[2])
  end
end
for _, g in ipairs(req.grants or {}) do
  redis.call('HSET', KEYS[3], g[1], g[3])
  redis.call('ZADD', KEYS[2], 0, g[2])
end
for _, h in ipairs(req.holds or {}) do
  redis.call('HSET', h[1], 's', 'open', 'd', h[3], 'f', h[4], 'a', h[5])
  redis.call('ZADD', KEYS[4], h[6], h[2])
end
redis.call('HSET', KEYS[1], 'loaded', req.now, 'recheck_until', req.recheck_until, 'v', req.version or 0)
return reply('ok')
