//! The Lua the Redis limiter runs: each script is one atomic step on the shared counters.
//!
//! A decision's keys all share one hash tag (the key's identity if it has identity limits, else
//! its id), so on a Cluster every script runs on one node; the batch record of a single node's
//! batch is the one key outside that rule, and a Cluster's batches hold one tag each.

/// Decides a batch of requests, one after the other as if each came alone: a request's limits,
/// then its usage; it keeps its writes only if everything passes (all or nothing), and records
/// what it took in the batch's record so a cancel can take it back.
///
/// KEYS[1]: the batch record (a hash: `took`, what each entry took, and a mark per entry a cancel
/// reached first). Then, per entry: its limits' counters (the key's, then its identity's), then
/// its usage hashes (the key's, then its identity's, for those it has).
/// ARGV[1]: the record's lifetime in ms. ARGV[2]: MessagePack, an array of integers: per entry,
/// n limits, m usages, (limit, window ms, cost) per limit, then (allowed, reported, amount,
/// period) per usage: `period` is the start of the refill period the request is in (0: never
/// refills); a later one than the hash's counts from zero, an earlier one (a clock behind)
/// counts in the hash's.
/// Returns MessagePack, one array of integers: per entry either `1, m, spent × m, (remaining,
/// ttl) × n` or `0, kind (1 rate, 2 usage, 3 cancelled), limit index, wait ms`.
///
/// Where Redis's time goes, and so the shape (one 64-request batch, `INFO commandstats`): a
/// `redis.call` costs ~0.3 µs and a number passed to it ~0.2 µs more (Lua formats it), so a limit
/// is taken first and given back if the request does not fit (`INCRBY`, then its window's end:
/// two calls, where reading before writing takes four), and costs go as strings formatted once
/// per batch; `tonumber` costs ~0.2 µs, so the numbers come as MessagePack (`cmsgpack`, one C
/// call for the batch); one record field per batch, not per entry (a small hash inserts in
/// linear time). A window is its counter's expiry, set (`PEXPIREAT`, from one `TIME` per batch)
/// by the request that opens it; a request given back from a counter it opened deletes it, so
/// a refused request never opens a window.
pub(super) const DECIDE: &str = r#"
local record, ttl_ms = KEYS[1], ARGV[1]
local args = cmsgpack.unpack(ARGV[2])
-- A cancel that arrived first left its mark: only then is each entry looked up.
local cancels = redis.call('EXISTS', record) == 1
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local results, r = {}, 0
local taken, any = {}, false
-- Costs as the strings INCRBY takes, each written once per batch.
local texts = {}
local function text(n)
  local t = texts[n]
  if not t then t = string.format('%d', n); texts[n] = t end
  return t
end

local function refuse(kind, i, wait)
  results[r + 1], results[r + 2], results[r + 3], results[r + 4] = 0, kind, i, wait
  r = r + 4
end

-- The limits of the entry being decided (reused from entry to entry).
local limit, window, cost, count, ends, opened = {}, {}, {}, {}, {}, {}

-- Gives back what the first `upto` limits took: a counter the entry opened is deleted.
local function give_back(k, upto)
  for i = 1, upto do
    local key = KEYS[k + i - 1]
    if opened[i] then redis.call('DEL', key) else redis.call('DECRBY', key, text(cost[i])) end
  end
end

-- Decides one entry, appending its result; returns what it took (for the record), or false.
local function decide(k, a, n, m)
  for i = 1, n do
    limit[i], window[i], cost[i] = args[a], args[a + 1], args[a + 2]
    a = a + 3
    if cost[i] > limit[i] then
      -- Never fits: refused without being counted.
      give_back(k, i - 1)
      refuse(1, i, window[i])
      return false
    end
    local key = KEYS[k + i - 1]
    count[i] = redis.call('INCRBY', key, text(cost[i]))
    ends[i] = redis.call('PEXPIRETIME', key)
    opened[i] = ends[i] < 0
    if opened[i] then
      -- The counter did not exist: this request opens its window.
      ends[i] = now + window[i]
      redis.call('PEXPIREAT', key, text(ends[i]))
    end
    if count[i] > limit[i] then
      give_back(k, i)
      local wait = ends[i] - now
      if wait < 0 then wait = 0 end
      refuse(1, i, wait)
      return false
    end
  end
  local took, spent, writes = {m}, {}, {}
  for j = 1, m do
    local hash = KEYS[k + n + j - 1]
    local allowed, reported, charge, period = args[a], args[a + 1], args[a + 2], args[a + 3]
    a = a + 4
    local seen = tonumber(redis.call('HGET', hash, 'reported') or '0')
    local mine = tonumber(redis.call('HGET', hash, 'local') or '0')
    local stored = tonumber(redis.call('HGET', hash, 'period') or '0')
    if period > stored then mine = 0; stored = period end
    if reported > seen then mine = math.max(0, mine - (reported - seen)); seen = reported end
    if seen + mine + charge > allowed then
      give_back(k, n)
      refuse(2, 0, 0)
      return false
    end
    writes[j] = {hash, text(seen), text(mine + charge), text(stored)}
    spent[j] = seen + mine + charge
    took[2 * j], took[2 * j + 1] = charge, stored
  end
  for j = 1, m do
    local w = writes[j]
    redis.call('HSET', w[1], 'reported', w[2], 'local', w[3], 'period', w[4])
  end
  results[r + 1], results[r + 2] = 1, m
  r = r + 2
  for j = 1, m do results[r + j] = spent[j] end
  r = r + m
  for i = 1, n do
    local ttl = ends[i] - now
    if ttl < 1 then ttl = 1 end
    results[r + 1], results[r + 2] = limit[i] - count[i], ttl
    r = r + 2
    took[2 * m + 2 * i], took[2 * m + 2 * i + 1] = cost[i], ends[i]
  end
  return took
end

local k, a, entry = 2, 1, 0
while a <= #args do
  entry = entry + 1
  local n, m = args[a], args[a + 1]
  a = a + 2
  if cancels and redis.call('HEXISTS', record, entry) == 1 then
    refuse(3, 0, 0)
    taken[entry] = false
  else
    taken[entry] = decide(k, a, n, m)
    any = any or taken[entry] ~= false
  end
  k = k + n + m
  a = a + 3 * n + 4 * m
end
if any then
  redis.call('HSET', record, 'took', cmsgpack.pack(taken))
  redis.call('PEXPIRE', record, ttl_ms)
end
return cmsgpack.pack(results)
"#;

/// Takes back what DECIDE took for one entry of a batch, from the windows and the refill periods
/// it took it from, or marks the entry so a DECIDE still on its way refuses it. Once per entry:
/// the mark stays, and a second cancel (a retry whose first answer was lost) finds it.
/// KEYS: the entry's counters, its usage hashes, the batch record.
/// ARGV: the entry's index, the record's lifetime in ms.
pub(super) const CANCEL: &str = r#"
local record, entry = KEYS[#KEYS], ARGV[1]
if redis.call('HSETNX', record, entry, 'x') == 0 then return 0 end
redis.call('PEXPIRE', record, ARGV[2])
local all = redis.call('HGET', record, 'took')
if not all then return 0 end
local t = cmsgpack.unpack(all)[tonumber(entry)]
if not t then return 0 end
local m = t[1]
local n = (#t - 1 - 2 * m) / 2
for i = 1, n do
  local cost, expires = t[1 + 2*m + 2*i - 1], t[1 + 2*m + 2*i]
  if redis.call('PEXPIRETIME', KEYS[i]) == expires then
    local left = tonumber(redis.call('GET', KEYS[i]) or '0') - cost
    if left < 0 then left = 0 end
    redis.call('SET', KEYS[i], string.format('%d', left), 'KEEPTTL')
  end
end
for j = 1, m do
  local u, amount, period = KEYS[n + j], t[2*j], t[2*j + 1]
  if amount > 0 and tonumber(redis.call('HGET', u, 'period') or '0') == period then
    local mine = tonumber(redis.call('HGET', u, 'local') or '0') - amount
    if mine < 0 then mine = 0 end
    redis.call('HSET', u, 'local', string.format('%d', mine))
  end
end
return 1
"#;

/// Adds usage that happened without a decision here (what the fallback admitted, or what a
/// handler added after the fact) to the shared counters: to each window still open, and to each
/// balance in its refill period (one that has ended is dropped; a new one counts from zero).
/// KEYS: the limits' counters, the usage hashes. ARGV: n, the costs, then (amount, period) per
/// usage hash.
pub(super) const RECONCILE: &str = r#"
local n = tonumber(ARGV[1])
for i = 1, n do
  if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('INCRBY', KEYS[i], tonumber(ARGV[i + 1])) end
end
for j = 1, #KEYS - n do
  local u = KEYS[n + j]
  local amount, period = tonumber(ARGV[n + 2*j]), tonumber(ARGV[n + 2*j + 1])
  local stored = tonumber(redis.call('HGET', u, 'period') or '0')
  if period > stored then
    redis.call('HSET', u, 'local', amount, 'period', period)
  elseif period == stored and amount > 0 then
    redis.call('HINCRBY', u, 'local', amount)
  end
end
return 1
"#;

/// Reserves units of each limit for one instance to admit from locally (local-first mode): up to
/// what was asked, never past the limit, in the window open now (opening one if none is).
/// KEYS: the counters. ARGV: per counter (limit, window ms, units wanted).
/// Returns per counter {granted, ttl ms, window end (PEXPIRETIME), count after the grant}.
pub(super) const RESERVE: &str = r#"
local out = {}
for i = 1, #KEYS do
  local limit, window, want = tonumber(ARGV[3*i-2]), tonumber(ARGV[3*i-1]), tonumber(ARGV[3*i])
  local t = redis.call('PTTL', KEYS[i])
  local used = 0
  if t >= 0 then used = tonumber(redis.call('GET', KEYS[i])) end
  local grant = math.min(want, limit - used)
  if grant < 0 then grant = 0 end
  if t < 0 then
    t = window
    if grant > 0 then redis.call('SET', KEYS[i], grant, 'PX', window) end
  elseif grant > 0 then
    redis.call('INCRBY', KEYS[i], grant)
  end
  -- The counter exists now: it did, or the grant (at least 1 in a new window) made it.
  out[i] = {grant, t, redis.call('PEXPIRETIME', KEYS[i]), used + grant}
end
return out
"#;

/// The scripts, each hashed once (`EVALSHA`, loaded on `NOSCRIPT`).
pub(super) enum Script {
    Decide,
    Cancel,
    Reconcile,
    Reserve,
}

pub(super) fn script(which: Script) -> &'static redis::Script {
    use std::sync::OnceLock;
    static SCRIPTS: [OnceLock<redis::Script>; 4] = [const { OnceLock::new() }; 4];
    let i = which as usize;
    SCRIPTS[i].get_or_init(|| redis::Script::new([DECIDE, CANCEL, RECONCILE, RESERVE][i]))
}
