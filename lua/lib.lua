-- Tollgate shared Lua helpers.
--
-- The sidecar loads this file and every operation's file as one Redis Functions library
-- (host-sidecar/src/store/scripts.rs): these helpers are defined once, at FUNCTION LOAD, and
-- each operation stays one atomic FCALL. `KEYS` and `ARGV` are locals of the library that each
-- function sets from its parameters before its operation runs. Conventions every operation follows:
--   * ARGV[1] is a JSON object built by the sidecar; `now` in it is unix ms from the sidecar's
--     clock (tests inject it), never Redis TIME, so windows and expiry are deterministic.
--   * Every key shares one hash tag `{shard}`: a script touches one Redis Cluster slot. Keys a
--     script only learns from stored data (a hold's counters) are in that same slot.
--   * Scripts reply with a two-element array {kind, json}. Kinds: ok, replay, deny, cold,
--     recheck, conflict, gone, resolved.
--   * Every change appends exactly one event to the shard's outbox stream, in the same script.
--   * Numbers stay below 10^14 so Lua doubles and cjson (14 significant digits) stay exact.

local NO_EXPIRY = 99999999999999
local COUNTER_GRACE_MS = 3600000

local function num(v)
  if not v then return 0 end
  return tonumber(v) or 0
end

-- JSON is built by concatenation on the hot path: cjson.encode costs several µs per object and
-- would dominate a script. It is safe because every string that reaches a script is an id the
-- sidecar validated ([A-Za-z0-9_.:-], plus the `{}` `|` `/` of our own key names and members),
-- and every number is an integer below 10^14, which tostring prints exactly. `raw` values are
-- JSON the sidecar produced (meters, resource, the correlation id as a JSON string) or that this
-- script built.
-- Marks a string as ready-made JSON for jobj.
local RAW = {}
local function raw(s)
  if s == nil or s == '' then return nil end
  return setmetatable({s}, RAW)
end

local function jval(v)
  if type(v) == 'string' then return '"' .. v .. '"' end
  if type(v) == 'table' and getmetatable(v) == RAW then return v[1] end
  if type(v) == 'boolean' then return v and 'true' or 'false' end
  return tostring(v)
end

-- An object from a flat list {key1, value1, key2, value2, ...}; nil values are skipped.
local function jobj(kv)
  local parts = {}
  for i = 1, #kv, 2 do
    local v = kv[i + 1]
    if v ~= nil then parts[#parts + 1] = '"' .. kv[i] .. '":' .. jval(v) end
  end
  return '{' .. table.concat(parts, ',') .. '}'
end

-- An array of arrays of scalars (usage deltas, draws, ...) as raw JSON; nil when empty.
local function jrows(rows)
  if rows == nil or #rows == 0 then return nil end
  local out = {}
  for i, r in ipairs(rows) do
    local cells = {}
    for j, c in ipairs(r) do cells[j] = jval(c) end
    out[i] = '[' .. table.concat(cells, ',') .. ']'
  end
  return raw('[' .. table.concat(out, ',') .. ']')
end

-- Hot paths build JSON with one concatenation expression per object (Lua compiles `a .. b .. c`
-- into a single allocation); these give the optional `,"key":value` parts.
local function fs(k, v) -- string value
  if v == nil then return '' end
  return ',"' .. k .. '":"' .. v .. '"'
end
local function fr(k, v) -- number or ready-made JSON
  if v == nil or v == '' then return '' end
  return ',"' .. k .. '":' .. v
end

-- The arguments of authorize, consume and check:
--   ARGV[1] now  [2] account  [3] key id or ""  [4] idempotency key  [5] request fingerprint
--   [6] "1" if the ledger was already asked about the idempotency key (after a cold load)
--   [7] credit  [8] route  [9] model or ""  [10] hold id or ""  [11] hold expiry (ms)
--   [12] idempotency record ttl (ms)  [13] meters as JSON  [14] resource as JSON or ""
--   [15] number of limits, then 8 per limit: scope, meter, period, amount, max, period end, name,
--   mode (e enforce, s soft, h shadow: see eval_limits),
--   then the account version the sidecar's limits come from (see `stale`),
--   then the caller's correlation id as a JSON string (quotes included) or "" (ARGV[16 + n*8]
--   and ARGV[17 + n*8] for n limits), then the request's tombstone field and the ttl of its
--   tombstone bucket in ms (ARGV[18 + n*8], ARGV[19 + n*8]; see tomb_get). The correlation id
--   is recorded on the hold record and the event as is; it is no part of the fingerprint, so a
--   replay keeps the first one's.
-- The counter of limit i is KEYS[first + i - 1] (first is given by each script).
local function spend_req()
  local function opt(s) if s == '' then return nil end return s end
  -- Numbers are kept in their argument form too (`*_s`): printing a Lua number costs more
  -- than everything else a JSON field needs.
  local req = {
    now = tonumber(ARGV[1]), now_s = ARGV[1], acct = ARGV[2], key = opt(ARGV[3]), idem = ARGV[4],
    fp = ARGV[5], checked = ARGV[6] == '1', credit = tonumber(ARGV[7]), credit_s = ARGV[7],
    route = ARGV[8], model = opt(ARGV[9]), hold = opt(ARGV[10]), exp = tonumber(ARGV[11]),
    exp_s = ARGV[11], idem_ttl_ms = ARGV[12], meters = ARGV[13], resource = opt(ARGV[14]), lims = {},
  }
  local n = tonumber(ARGV[15])
  for i = 1, n do
    local b = 15 + (i - 1) * 8
    req.lims[i] = {scope = ARGV[b + 1], meter = ARGV[b + 2], period = ARGV[b + 3],
      amt = tonumber(ARGV[b + 4]), amt_s = ARGV[b + 4], max = tonumber(ARGV[b + 5]),
      max_s = ARGV[b + 5], ['end'] = tonumber(ARGV[b + 6]), end_s = ARGV[b + 6], name = ARGV[b + 7],
      mode = ARGV[b + 8]}
  end
  -- After the limits: the version of the account the sidecar priced this with (0 = unknown),
  -- then the correlation id, ready-made JSON (the sidecar encoded it: it may hold any printable
  -- ASCII, quotes and backslashes too, unlike the ids this file splices in bare).
  req.ver = tonumber(ARGV[16 + n * 8] or '0') or 0
  req.cid = opt(ARGV[17 + n * 8] or '')
  -- Then the request's tombstone field and the tombstone bucket's ttl (see tomb_get).
  req.tomb = ARGV[18 + n * 8] or ''
  req.tomb_ttl_ms = ARGV[19 + n * 8] or '1000'
  return req
end

-- The arguments of commit and release:
--   ARGV[1] now  [2] hold id  [3] settle fingerprint  [4] credit  [5] tombstone bucket ttl (ms)
--   [6] tombstone field  [7] actual meters as JSON  [8] number of meters, then 2 per meter:
--   name, amount; then what the script itself takes (req.next is its index)
local function settle_req()
  local req = {now = tonumber(ARGV[1]), now_s = ARGV[1], hold = ARGV[2], fp = ARGV[3],
    credit = tonumber(ARGV[4]), tomb_ttl_ms = ARGV[5], tomb = ARGV[6], meters_json = ARGV[7],
    meters = {}}
  local n = tonumber(ARGV[8] or '0')
  for i = 1, n do
    req.meters[ARGV[7 + i * 2]] = tonumber(ARGV[8 + i * 2])
  end
  req.next = 9 + n * 2
  return req
end

-- Tombstones: what replay protection needs of a settled request, and nothing else. A settled
-- hold's record (its hash: ~1.5 KB) is deleted and a one-line tombstone takes its place, in a
-- hash of many tombstones (a "bucket": small enough for Redis's compact listpack encoding, ~120
-- bytes per tombstone instead of a key of its own). The sidecar names two buckets per request,
-- KEYS[t] for the current time window and KEYS[t + 1] for the one before, and the field of the
-- request in them; a bucket expires one window after its own ended, so a tombstone is kept
-- for one to two replay windows (`server.replay_window_secs`). A repeat after that is answered
-- from the ledger.
--   value: status | request fingerprint | settle fingerprint | credits charged | shortfall | hold expiry
--   status: c committed, r released, x expired, k cancelled (never held), n consumed
-- Fingerprints are kept to 16 hex digits (64 bits): enough to tell a repeat from a different
-- request.
local TOMB_STATUS = {c = 'committed', r = 'released', x = 'expired', k = 'cancelled', n = 'consumed'}
local TOMB_CODE = {committed = 'c', released = 'r', expired = 'x', cancelled = 'k', consumed = 'n'}

local function fp16(fp)
  return string.sub(fp or '', 1, 16)
end

local function tomb_get(t, field)
  if field == nil or field == '' then return nil end
  local v = redis.call('HGET', KEYS[t], field)
  if not v then v = redis.call('HGET', KEYS[t + 1], field) end
  if not v then return nil end
  local st, afp, sfp, cr, sh, exp = string.match(v, '^(%a)|([^|]*)|([^|]*)|(%d*)|(%d*)|(%d*)$')
  if not st then return nil end
  return {status = TOMB_STATUS[st], afp = afp, sfp = sfp, credits = cr, short = sh, exp = exp}
end

local function tomb_put(t, field, ttl_ms, status, afp, sfp, credits, short, exp)
  redis.call('HSET', KEYS[t], field, TOMB_CODE[status] .. '|' .. fp16(afp) .. '|' .. fp16(sfp) ..
    '|' .. (credits or '') .. '|' .. (short or '') .. '|' .. (exp or ''))
  redis.call('PEXPIRE', KEYS[t], ttl_ms)
end

-- Grants live in a lex-ordered zset (all scores 0) whose members sort in spending order:
-- "PPPP|EEEEEEEEEEEEEE|CCCCCCCCCCCCCC|grant_id" = priority, expiry (ms), creation (ms), id.
-- The remaining amount is in a hash keyed by grant id.
local function grant_member(priority, expires, created, gid)
  return string.format('%04d|%014d|%014d|%s', priority, expires, created, gid)
end

local function grant_parts(m)
  local e, gid = string.match(m, '^%d+|(%d+)|%d+|(.+)$')
  return gid, tonumber(e)
end

-- Reads the spendable grants in spending order. Returns total spendable, the live grants
-- {gid, member, remaining} and the expired ones (still present, to be recorded and removed).
local function read_grants(zkey, hkey, now)
  local members = redis.call('ZRANGE', zkey, 0, -1)
  local live, expired, total = {}, {}, 0
  if #members == 0 then return 0, live, expired end
  local gids, exps = {}, {}
  for i, m in ipairs(members) do gids[i], exps[i] = grant_parts(m) end
  local rems = redis.call('HMGET', hkey, unpack(gids))
  for i, m in ipairs(members) do
    local gid, exp = gids[i], exps[i]
    local rem = num(rems[i])
    if exp <= now then
      expired[#expired + 1] = {gid, m, rem}
    else
      live[#live + 1] = {gid, m, rem}
      total = total + rem
    end
  end
  return total, live, expired
end

-- Removes expired grants, recording their remainder in `xout` ({gid, amount}).
local function expire_grants(zkey, hkey, expired, xout)
  for _, g in ipairs(expired) do
    if g[3] > 0 then xout[#xout + 1] = {g[1], g[3]} end
    redis.call('ZREM', zkey, g[2])
    redis.call('HDEL', hkey, g[1])
  end
end

-- Draws `amount` from live grants in order. Returns the draws {member, amount} and what could
-- not be covered. Appends remaining-deltas {gid, -amount} to gout.
local function draw(zkey, hkey, live, amount, gout)
  local draws = {}
  for _, g in ipairs(live) do
    if amount <= 0 then break end
    local take = math.min(g[3], amount)
    if take > 0 then
      local left = redis.call('HINCRBY', hkey, g[1], -take)
      if left <= 0 then
        redis.call('ZREM', zkey, g[2])
        redis.call('HDEL', hkey, g[1])
      end
      draws[#draws + 1] = {g[2], take}
      gout[#gout + 1] = {g[1], -take}
      amount = amount - take
    end
  end
  return draws, amount
end

-- Returns `amount` of credit to the grants it was drawn from, last draw first (undoing the tail
-- of the spending order). Credit returned to a grant that has expired meanwhile is recorded as
-- expired at once ({gid, +amount} in gout and {gid, amount} in xout): it is never spendable again.
-- `ws` are the wallets the draws were made from (see wallets below): a draw names its wallet's
-- account in its third element when it is not the account's own.
local function give_back(ws, draws, amount, now, gout, xout)
  local by = {}
  for _, w in ipairs(ws) do by[w.acct] = w end
  local i = #draws
  while amount > 0 and i >= 1 do
    local m, amt, acct = draws[i][1], draws[i][2], draws[i][3]
    local w = by[acct or '']
    local back = math.min(amt, amount)
    if back > 0 and w then
      local gid, exp = grant_parts(m)
      gout[#gout + 1] = {gid, back, acct}
      if exp <= now then
        xout[#xout + 1] = {gid, back, acct}
      elseif redis.call('HINCRBY', w.h, gid, back) == back then
        -- The draw had exhausted the grant and taken it out of the order: put it back.
        redis.call('ZADD', w.z, 0, m)
      end
      draws[i][2] = amt - back
      amount = amount - back
    end
    i = i - 1
  end
  local kept = {}
  for _, d in ipairs(draws) do
    if d[2] > 0 then kept[#kept + 1] = d end
  end
  return kept
end

-- Sliding windows (period `s:<ms>`): the counter at KEYS[i] is the sum of what the window
-- holds, and `<counter>:log` (same hash tag, same slot) a sorted set of one member per charge,
-- `<ms>|<request>|<amount>`, scored by when it was charged. A charge leaves the sum once it is
-- older than the window: exact at every instant, not per calendar period. Both keys expire a
-- window after the last charge. They are Redis's only: the ledger records the requests, not
-- these sums (a Redis that lost them starts the window empty).
local function sliding_ms(period)
  if string.sub(period, 1, 2) ~= 's:' then return nil end
  return tonumber(string.sub(period, 3))
end

local function slide_amount(member)
  return tonumber(string.match(member, '|(%d+)$')) or 0
end

-- What the sliding window of `key` holds at `now`, read without changing anything (check).
local function slide_peek(key, w, now)
  local total = 0
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', key .. ':log', '(' .. (now - w), '+inf')) do
    total = total + slide_amount(m)
  end
  return total
end

-- Drops what has left the window of the sliding counter `key` at `now`.
local function slide(key, w, now)
  local log = key .. ':log'
  local gone = redis.call('ZRANGEBYSCORE', log, '-inf', now - w)
  if #gone == 0 then return end
  local total = 0
  for _, m in ipairs(gone) do total = total + slide_amount(m) end
  redis.call('ZREMRANGEBYSCORE', log, '-inf', now - w)
  if total > 0 then
    if redis.call('DECRBY', key, total) < 0 then redis.call('SET', key, 0, 'KEEPTTL') end
  end
end

-- Moves a hold's sliding charge (counter row `c`: key, ..., amount at c[5], log member at c[9])
-- to `amount`, while the charge is still in the window; the sum moves by the difference, never
-- below zero. Returns the difference applied (0 once the charge has left the window) and the
-- charge's member now (nil when it is gone).
local function slide_move(c, amount)
  local log = c[1] .. ':log'
  local score = redis.call('ZSCORE', log, c[9])
  if not score then return 0, nil end
  redis.call('ZREM', log, c[9])
  local member = nil
  if amount > 0 then
    member = (string.gsub(c[9], '|%d+$', '|' .. amount))
    redis.call('ZADD', log, score, member)
  end
  local d = amount - c[5]
  if d ~= 0 then
    local v = redis.call('INCRBY', c[1], d)
    if v < 0 then
      redis.call('SET', c[1], 0, 'KEEPTTL')
      d = d - v
    end
  end
  return d, member
end

-- Evaluates limits. `lims` are {scope, meter, period, amt, max, end, name, mode} with counter
-- keys at KEYS[first + i - 1]; `peek` for a check, which may not write. Returns (nil, tightest, its remaining, shadow) when every
-- enforced limit admits the request, or (denying, used) for the first one that does not. A
-- limit already at its max refuses even a zero estimate: the meter is exhausted.
-- Modes: an enforced limit (e) refuses; a soft one (s) never refuses (charge_counters reports
-- what it is over by); a shadow one (h) that would refuse is marked `skip` — not charged, as
-- enforcement would not have charged it — and named in `shadow` (a JSON array of limit names,
-- nil when none would refuse). Only enforced limits are the "tightest" reported.
local function eval_limits(lims, first, now, peek)
  local tight, tight_rem, shadow = nil, nil, nil
  if #lims == 0 then return nil, nil, nil, nil end
  local peeked = {}
  for i, l in ipairs(lims) do
    l.slide = sliding_ms(l.period)
    if l.slide then
      -- A check changes nothing (it runs read-only): it sums the window instead of trimming it.
      if peek then
        peeked[i] = slide_peek(KEYS[first + i - 1], l.slide, now)
      else
        slide(KEYS[first + i - 1], l.slide, now)
      end
    end
  end
  -- Every counter in one command (they share the hash tag: one slot).
  local used_all = redis.call('MGET', unpack(KEYS, first, first + #lims - 1))
  for i, l in ipairs(lims) do
    local used = peeked[i] or num(used_all[i])
    l.used = used
    local over = used + l.amt > l.max or used >= l.max
    if l.mode == 'h' then
      if over then
        l.skip = true
        shadow = shadow or {}
        shadow[#shadow + 1] = '"' .. l.name .. '"'
      end
    elseif l.mode ~= 's' then
      if over then
        if l.slide then
          -- Retry when the oldest charge in the window leaves it.
          local oldest = redis.call('ZRANGE', KEYS[first + i - 1] .. ':log', 0, 0, 'WITHSCORES')
          if oldest[2] then l.end_s = tostring(tonumber(oldest[2]) + l.slide) end
        end
        return l, used
      end
      local rem = l.max - used - l.amt
      if tight_rem == nil or rem < tight_rem then tight, tight_rem = l, rem end
    end
  end
  if shadow then shadow = '[' .. table.concat(shadow, ',') .. ']' end
  return nil, tight, tight_rem, shadow
end

-- Milliseconds until an hour after a window ends, measured on the sidecar's clock (`now`), so a
-- clock difference between sidecar and Redis cannot expire a live counter.
local function counter_ttl(pend, now)
  return pend - now + COUNTER_GRACE_MS
end

-- Adds each limit's amount to its counter; new counters expire an hour after their window.
-- A limit eval_limits marked `skip` (a shadow limit that would have refused) is not charged.
-- Returns the usage deltas [[scope, meter, period, delta, end], ...], the counters
-- [[key, scope, meter, period, amount, end, max, name], ...] (the hold's: what its settlement
-- moves), each limit's used amount after the charge [n1, n2, ...] (what alerts are computed
-- from) and the soft limits now past their max [[name, over by], ...], as JSON (nil when empty).
local function charge_counters(lims, first, now, tag)
  local u, ctr, used, over = {}, {}, {}, {}
  for i, l in ipairs(lims) do
    local k = KEYS[first + i - 1]
    if l.skip then
      used[i] = l.used or 0
    else
      -- A sliding window's charge is a log member too (kept on the hold's counter row, for its
      -- settlement), and gives no usage row to the ledger (see slide); a calendar counter
      -- expires an hour after its window.
      local member, end_s = nil, l.end_s
      if l.slide then member, end_s = now .. '|' .. tag .. '|' .. l.amt_s, '0' end
      if l.amt > 0 then
        used[i] = redis.call('INCRBY', k, l.amt)
        if member then
          redis.call('ZADD', k .. ':log', now, member)
          redis.call('PEXPIRE', k, l.slide + 1000)
          redis.call('PEXPIRE', k .. ':log', l.slide + 1000)
        else
          if used[i] == l.amt and l['end'] > 0 then
            redis.call('PEXPIRE', k, math.max(1, counter_ttl(l['end'], now)))
          end
          u[#u + 1] = '["' .. l.scope .. '","' .. l.meter .. '","' .. l.period .. '",' .. l.amt_s .. ',' .. l.end_s .. ']'
        end
      else
        used[i] = num(redis.call('GET', k))
      end
      if l.mode == 's' and used[i] > l.max then
        over[#over + 1] = '["' .. l.name .. '",' .. (used[i] - l.max) .. ']'
      end
      -- The limit's max and name (max as a string: a decoded number past 2^53 or printed by Lua
      -- as 1e+14 would not survive) let a commit that grows the counter raise its alerts; its
      -- sliding log member (false for a calendar counter) and its mode (e/s/h) let an extension
      -- move the charge and know whether the limit may refuse.
      local log_member = 'false'
      if member then log_member = '"' .. member .. '"' end
      ctr[#ctr + 1] = '["' .. k .. '","' .. l.scope .. '","' .. l.meter .. '","' .. l.period .. '",' .. l.amt_s .. ',' .. end_s ..
        ',"' .. l.max_s .. '","' .. l.name .. '",' .. log_member .. ',"' .. l.mode .. '"]'
    end
  end
  local uj, cj, usedj, overj = nil, nil, nil, nil
  if #u > 0 then uj = '[' .. table.concat(u, ',') .. ']' end
  if #ctr > 0 then cj = '[' .. table.concat(ctr, ',') .. ']' end
  if #used > 0 then usedj = '[' .. table.concat(used, ',') .. ']' end
  if #over > 0 then overj = '[' .. table.concat(over, ',') .. ']' end
  return uj, cj, usedj, overj
end

-- Applies a delta to a stored counter (commit/release), never below zero. Returns the delta
-- actually applied.
local function adjust_counter(key, delta, pend, now)
  if delta == 0 then return 0 end
  local v = redis.call('INCRBY', key, delta)
  if v < 0 then
    redis.call('SET', key, 0, 'KEEPTTL')
    delta = delta - v
  end
  if v == delta and pend > 0 then redis.call('PEXPIRE', key, math.max(1, counter_ttl(pend, now))) end
  return delta
end

-- The state of a limit as JSON, or nil.
local function limit_state(l, remaining)
  if l == nil then return nil end
  if remaining < 0 then remaining = 0 end
  return '{"name":"' .. l.name .. '","max":' .. l.max_s .. ',"remaining":' .. remaining ..
    ',"reset_ms":' .. l.end_s .. '}'
end

-- A deny reply.
local function deny(reason, l, remaining, credit_s, balance)
  return {'deny', '{"reason":"' .. reason .. '"' .. fr('limit', limit_state(l, remaining)) ..
    ',"credits":' .. credit_s .. fr('balance', balance) .. '}'}
end

-- Appends one ledger event (a JSON object) to the shard's outbox.
local function emit(outbox, event)
  redis.call('XADD', outbox, '*', 'e', event)
end

-- [[string, number], ...] (grant deltas, expiries, draws) as JSON, or nil when empty.
local function rows_json(rows)
  if #rows == 0 then return nil end
  local out = {}
  for i, r in ipairs(rows) do
    -- A third element names the grant's account when it is not the event's (a parent's).
    if r[3] then
      out[i] = '["' .. r[1] .. '",' .. r[2] .. ',"' .. r[3] .. '"]'
    else
      out[i] = '["' .. r[1] .. '",' .. r[2] .. ']'
    end
  end
  return '[' .. table.concat(out, ',') .. ']'
end

-- An account's state is present only after it was loaded (from the ledger, or empty for a new
-- account). Returns nil when absent; otherwise the time until which idempotency misses must be
-- re-checked against PostgreSQL (non-zero only just after a cold load).
-- The second value is the account's version: bumped by the sidecar whenever the account's plan,
-- limits or keys change, so a sidecar still pricing with an older version is told `stale`.
local function account_state(akey)
  local st = redis.call('HMGET', akey, 'loaded', 'recheck_until', 'v')
  if not st[1] then return nil end
  return num(st[2]), num(st[3])
end

local function reply(kind, body)
  return {kind, body or ''}
end

-- Whether a level above the account (its parent, its root: KEYS[from..], their state hashes,
-- none for an account without a parent) is missing from Redis. Their counters are shared with
-- this account's requests, so nothing is decided until every level is loaded (a cold load
-- loads the missing ones, then the script runs again).
local function levels_cold(from)
  local i = from
  while i <= #KEYS do
    if redis.call('EXISTS', KEYS[i]) == 0 then return true end
    if KEYS[i + 1] == KEYS[i] .. ':go' then i = i + 3 else i = i + 1 end
  end
  return false
end

-- Wallets: the credit a spend draws on, in order — the account's own grants (own_z, own_h),
-- then each level above whose credit it may spend (draw_from_parents): among the levels'
-- keys (KEYS[from..], see levels_cold), a paying level's state hash is followed by its grant
-- order and remaining amounts. A wallet is {z, h, acct}, acct '' for the account's own.
local function wallets(own_z, own_h, from)
  local ws = {{z = own_z, h = own_h, acct = ''}}
  local i = from
  while i <= #KEYS do
    if KEYS[i + 1] == KEYS[i] .. ':go' then
      ws[#ws + 1] = {z = KEYS[i + 1], h = KEYS[i + 2], acct = string.match(KEYS[i], '}:a:(.*)$')}
      i = i + 3
    else
      i = i + 1
    end
  end
  return ws
end

-- Spendable credit across the wallets (each wallet keeps its live and expired grants).
local function read_wallets(ws, now)
  local total = 0
  for _, w in ipairs(ws) do
    w.bal, w.live, w.expired = read_grants(w.z, w.h, now)
    total = total + w.bal
  end
  return total
end

-- Rows of another account's grants name it (third element).
local function tag_rows(out, rows, acct)
  for _, r in ipairs(rows) do
    if acct ~= '' then r[3] = acct end
    out[#out + 1] = r
  end
end

local function expire_wallets(ws, xout)
  for _, w in ipairs(ws) do
    local xs = {}
    expire_grants(w.z, w.h, w.expired or {}, xs)
    tag_rows(xout, xs, w.acct)
  end
end

-- Draws `amount` from the wallets in order (after read_wallets). Returns the draws and what
-- could not be covered.
local function draw_wallets(ws, amount, gout)
  local draws = {}
  for _, w in ipairs(ws) do
    if amount <= 0 then break end
    local gs = {}
    local d, left = draw(w.z, w.h, w.live or {}, amount, gs)
    tag_rows(draws, d, w.acct)
    tag_rows(gout, gs, w.acct)
    amount = left
  end
  return draws, amount
end

-- An open hold's record is a hash: d = the hold (JSON: acct, key, exp, credit, draws, ctr,
-- meters, route, model, at, fp, and cid = the correlation id when the request had one), f =
-- request fingerprint, a = authorize answer (JSON), s = open. Once settled it is deleted and a
-- tombstone (tomb_put) answers repeats.

-- Settles an open hold (commit, release, expire): moves every counter and the credit from the
-- estimate to the actual amounts (zero for release/expire), resolves the hold exactly once and
-- records one event (carrying the hold's correlation id, if it had one). Shared by commit.lua
-- and release.lua.
--
-- KEYS: 1 account state, 2 outbox, 3 hold record, 4 open holds zset, 5 grant order, 6 grant
-- remaining, 7 and 8 the tombstone buckets (current, previous)
-- req: see settle_req; status: committed | released | expired
-- A commit may name the route and model it was priced with (req.route, req.model: the model ''
-- for none); when they are not the hold's, nothing changes and the answer is `conflict` with the
-- hold's route and model, for the sidecar to refuse or price again.
local EVENT_OF = {committed = 'commit', released = 'release', expired = 'expire'}

local function settle_hold(req, status)
  local meters_raw = req.meters_json
  if account_state(KEYS[1]) == nil or levels_cold(9) then return reply('cold') end
  local rec = redis.call('HMGET', KEYS[3], 's', 'd', 'sf', 'sr')
  if not rec[1] then
    local t = tomb_get(7, req.tomb)
    if t == nil then return reply('gone') end
    if t.status == status and t.sfp == fp16(req.fp) then
      local m = '{}'
      if status == 'committed' then m = meters_raw end
      return reply('replay', '{"hold":"' .. req.hold .. '","status":"' .. status .. '","credits":' ..
        t.credits .. ',"shortfall":' .. t.short .. ',"meters":' .. m .. '}')
    end
    return reply('resolved', jobj({'status', t.status}))
  end
  if req.replay_only then return reply('gone') end
  if rec[1] ~= 'open' then
    -- A record settled before tombstones (kept as a hash with its settle answer), or the
    -- `cancelled` marker such a release wrote.
    if rec[1] == status and rec[3] == req.fp then return reply('replay', rec[4]) end
    return reply('resolved', jobj({'status', rec[1]}))
  end
  local h = cjson.decode(rec[2])
  if req.route ~= nil and ((h.route or 'default') ~= req.route or (h.model or '') ~= req.model) then
    return reply('conflict', '{"route":' .. cjson.encode(h.route or '') .. ',"model":' ..
      cjson.encode(h.model or '') .. '}')
  end
  -- The hold's correlation id goes on its settlement too (decoded from the record: encoded again).
  local cid = nil
  if type(h.cid) == 'string' then cid = cjson.encode(h.cid) end
  local committing = status == 'committed'
  local meters = req.meters
  if not committing then
    meters = {}
    meters_raw = '{}'
  end

  local u, grew = {}, {}
  for _, c in ipairs(h.ctr or {}) do
    -- A concurrency counter (period `c`) gives back the whole hold: it is no longer in flight.
    local actual = num(meters[c[3]])
    if c[4] == 'c' then actual = 0 end
    local d = 0
    if c[9] then
      -- A sliding window: the charge's log member takes the actual amount, and the sum moves by
      -- the difference, while the charge is still in the window (after, it counts no more).
      d = slide_move(c, actual)
    else
      d = adjust_counter(c[1], actual - c[5], c[6], req.now)
    end
    if d ~= 0 and not c[9] then
      u[#u + 1] = '["' .. c[2] .. '","' .. c[3] .. '","' .. c[4] .. '",' .. d .. ',' .. c[6] .. ']'
    end
    -- A limit this commit took further than its estimate: [name, scope, meter, period, max,
    -- used] for its alerts (holds recorded before counters carried max and name have none).
    if d > 0 and c[8] then
      grew[#grew + 1] = '["' .. c[8] .. '","' .. c[2] .. '","' .. c[3] .. '","' .. c[4] .. '",' .. c[7] ..
        ',' .. (redis.call('GET', c[1]) or '0') .. ']'
    end
  end
  local uj, gj = nil, nil
  if #u > 0 then uj = '[' .. table.concat(u, ',') .. ']' end
  if #grew > 0 then gj = '[' .. table.concat(grew, ',') .. ']' end

  local want = 0
  if committing then want = req.credit end
  local g, x = {}, {}
  local charged, short = want, 0
  local ws = wallets(KEYS[5], KEYS[6], 9)
  if want < h.credit then
    give_back(ws, h.draws or {}, h.credit - want, req.now, g, x)
  elseif want > h.credit then
    read_wallets(ws, req.now)
    expire_wallets(ws, x)
    local _, left = draw_wallets(ws, want - h.credit, g)
    short = left
    charged = want - left
  end

  local res = '{"hold":"' .. req.hold .. '","status":"' .. status .. '","credits":' .. charged ..
    ',"shortfall":' .. short .. ',"meters":' .. meters_raw .. fr('grew', gj) .. '}'
  redis.call('DEL', KEYS[3])
  tomb_put(7, req.tomb, req.tomb_ttl_ms, status, h.fp, req.fp, charged, short, h.exp)
  redis.call('ZREM', KEYS[4], req.hold)
  emit(KEYS[2], '{"t":"' .. EVENT_OF[status] .. '","acct":"' .. h.acct .. '"' .. fs('key', h.key) ..
    ',"hold":"' .. req.hold .. '","fp":"' .. req.fp .. '","at":' .. req.now_s .. ',"credit":' .. charged ..
    ',"short":' .. short .. ',"meters":' .. meters_raw .. fs('route', h.route) .. fs('model', h.model) ..
    fr('cid', cid) .. fr('u', uj) .. fr('g', rows_json(g)) .. fr('x', rows_json(x)) .. ',"result":' .. res .. '}')
  return reply('ok', res)
end
