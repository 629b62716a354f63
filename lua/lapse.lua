-- lapse: record credit that can no longer be spent — grants past their expiry (the expiry job)
-- and grants revoked by id (a refunded purchase) — and remove them. Nothing to record: no event.
--
-- KEYS[1] account state hash   KEYS[2] outbox stream
-- KEYS[3] grant order zset     KEYS[4] grant remaining hash
-- ARGV[1] JSON {now, acct, kind ("lapse" | "revoke"), idem (what caused it), revoke: [grant ids]}
-- Returns {kind, json}: ok {expired: [[grant id, amount], ...], balance} | cold
local req = cjson.decode(ARGV[1])
if account_state(KEYS[1]) == nil then return reply('cold') end
local _, live, gone = read_grants(KEYS[3], KEYS[4], req.now)
local revoke = {}
for _, gid in ipairs(req.revoke or {}) do revoke[gid] = true end
local balance = 0
for _, g in ipairs(live) do
  if revoke[g[1]] then gone[#gone + 1] = g else balance = balance + g[3] end
end
local x = {}
expire_grants(KEYS[3], KEYS[4], gone, x)
local xj = rows_json(x)
local res = '{"expired":' .. (xj or '[]') .. ',"balance":' .. balance .. '}'
if xj then
  emit(KEYS[2], jobj({'t', req.kind, 'acct', req.acct, 'idem', req.idem, 'at', req.now,
    'x', raw(xj), 'result', raw(res)}))
end
return reply('ok', res)
