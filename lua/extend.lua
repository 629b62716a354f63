-- extend: raise an open hold's estimate to new totals (a stream that outgrew its hold). Every
-- counter the hold counts on and the credit balance are checked for what the extension adds —
-- all or nothing, as at authorize — then charged, and the hold's record takes the new amounts,
-- so its commit or release settles them like the rest. The totals are absolute: a repeat (a
-- retry) adds nothing and answers the same.
--
-- KEYS[1] account state   KEYS[2] outbox   KEYS[3] hold record   KEYS[4] grant order
-- KEYS[5] grant remaining   KEYS[6..] the levels above (see levels_cold in lib.lua)
-- ARGV[1] now  [2] hold id  [3] route  [4] model or ''  [5] the hold's credit at the new totals
--   [6] number of meters, then 2 per meter: name, new total
-- (Which of the hold's limits may refuse is on its counter rows: see charge_counters.)
-- Returns {kind, json}: ok {hold, credits, balance} | deny {reason, limit, credits, balance} |
--   gone (no such open hold in Redis) | resolved {status} | conflict {route, model} | cold
-- (A concurrency counter holds the request, not its amount: an extension leaves it as it is.)
local now, hold = tonumber(ARGV[1]), ARGV[2]
if account_state(KEYS[1]) == nil or levels_cold(6) then return reply('cold') end
local rec = redis.call('HMGET', KEYS[3], 's', 'd')
if not rec[1] then return reply('gone') end
if rec[1] ~= 'open' then return reply('resolved', jobj({'status', rec[1]})) end
local h = cjson.decode(rec[2])
if (h.route or 'default') ~= ARGV[3] or (h.model or '') ~= ARGV[4] then
  return reply('conflict', '{"route":' .. cjson.encode(h.route or '') .. ',"model":' ..
    cjson.encode(h.model or '') .. '}')
end
local target = {}
for i = 1, tonumber(ARGV[6]) do target[ARGV[5 + i * 2]] = tonumber(ARGV[6 + i * 2]) end
local credit_to = math.max(tonumber(ARGV[5]), h.credit)
local add_credit = credit_to - h.credit

-- What each of the hold's counters takes more; an enforced limit must admit it.
local adds = {}
for i, c in ipairs(h.ctr or {}) do
  local want = target[c[3]]
  if c[3] == 'credits' then want = credit_to end
  local add = 0
  if want and c[4] ~= 'c' then add = math.max(0, want - c[5]) end
  adds[i] = add
  -- Soft and shadow limits (mode s, h: recorded on the hold's counter) never refuse.
  if add > 0 and c[10] ~= 's' and c[10] ~= 'h' then
    -- A sliding window first drops what has left it (see slide in lib.lua).
    if c[9] then slide(c[1], sliding_ms(c[4]), now) end
    local used = num(redis.call('GET', c[1]))
    local max = tonumber(c[7]) or 0
    if used + add > max then
      local l = {name = c[8] or '', max_s = tostring(c[7]), end_s = tostring(c[6])}
      return deny('limit', l, max - used, tostring(add_credit))
    end
  end
end
local grows = add_credit > 0
for _, a in ipairs(adds) do grows = grows or a > 0 end
if type(h.meters) ~= 'table' then h.meters = {} end
for m, t in pairs(target) do grows = grows or t > (tonumber(h.meters[m]) or 0) end
if not grows then
  -- Already at these totals (a retry): the same answer, nothing written.
  return reply('ok', '{"hold":"' .. hold .. '","credits":' .. string.format('%d', h.credit) .. '}')
end
local balance, ws = nil, nil
if add_credit > 0 then
  ws = wallets(KEYS[4], KEYS[5], 6)
  balance = read_wallets(ws, now)
  if balance < add_credit then return deny('credits', nil, nil, tostring(add_credit), balance) end
end

-- Admitted: the counters, the credit, the record.
local u, g, x = {}, {}, {}
for i, c in ipairs(h.ctr or {}) do
  local add = adds[i]
  if add > 0 then
    if c[9] then
      -- A sliding window: its charge of this hold grows, while it is still in the window.
      local _, member = slide_move(c, c[5] + add)
      if member then c[9] = member end
    else
      local v = redis.call('INCRBY', c[1], add)
      if v == add and c[6] > 0 then
        redis.call('PEXPIRE', c[1], math.max(1, c[6] - now + 3600000))
      end
      u[#u + 1] = '["' .. c[2] .. '","' .. c[3] .. '","' .. c[4] .. '",' .. add .. ',' .. c[6] .. ']'
    end
    c[5] = c[5] + add
  end
end
if add_credit > 0 then
  expire_wallets(ws, x)
  local draws = draw_wallets(ws, add_credit, g)
  h.draws = h.draws or {}
  for _, d in ipairs(draws) do h.draws[#h.draws + 1] = d end
  balance = balance - add_credit
end
h.credit = credit_to
for m, t in pairs(target) do
  if t > (tonumber(h.meters[m]) or 0) then h.meters[m] = t end
end
local recj = cjson.encode(h)
redis.call('HSET', KEYS[3], 'd', recj)
local uj = nil
if #u > 0 then uj = '[' .. table.concat(u, ',') .. ']' end
local res = '{"hold":"' .. hold .. '","credits":' .. string.format('%d', credit_to) ..
  fr('balance', balance and string.format('%d', balance)) .. '}'
emit(KEYS[2], '{"t":"extend","acct":"' .. h.acct .. '"' .. fs('key', h.key) .. ',"hold":"' .. hold ..
  '","at":' .. ARGV[1] .. ',"credit":' .. string.format('%d', add_credit) .. ',"meters":' ..
  cjson.encode(h.meters) .. fs('route', h.route) .. fs('model', h.model) .. fr('u', uj) ..
  fr('g', rows_json(g)) .. fr('x', rows_json(x)) .. ',"rec":' .. recj .. ',"result":' .. res .. '}')
return reply('ok', res)
