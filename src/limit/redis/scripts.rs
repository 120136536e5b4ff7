//! The Lua the Redis limiter runs: each script is one atomic step on the shared counters.
//!
//! A decision's keys all share one hash tag (the key's identity if it has identity limits, else
//! its id), so on a Cluster every script runs on one node; the batch record of a single node's
//! batch is the one key outside that rule, and a Cluster's batches hold one tag each.

/// Decides a batch of requests, one after the other as if each came alone: a request's limits,
/// then its usage; it writes only if everything passes (all or nothing), and records what it took
/// in the batch's record so a cancel can take it back.
///
/// KEYS[1]: the batch record (a hash: entry index → what it took, or `x` for cancelled). Then,
/// per entry: its limits' counters (the key's, then its identity's), then its usage hashes (the
/// key's, then its identity's, for those it has).
/// ARGV[1]: the record's lifetime in ms. Then, per entry: n limits, m usages, (limit, window ms,
/// cost) per limit, then (allowed, reported, amount, period) per usage: `period` is the start of
/// the refill period the request is in (0: never refills); a later one than the hash's counts
/// from zero, an earlier one (a clock behind) counts in the hash's.
/// Returns, per entry, `1,m,spent…,remaining,ttl,…` or `0,kind (1 rate, 2 usage, 3 cancelled),
/// limit index,wait ms`, entries separated by `;`: one string, which costs the client far less to
/// read than nested arrays.
pub(super) const DECIDE: &str = r#"
local record, ttl_ms = KEYS[1], ARGV[1]
-- A cancel that arrived first left its mark: only then is each entry looked up.
local cancels = redis.call('EXISTS', record) == 1

local function decide(k, a, n, m)
  local used, ttl = {}, {}
  for i = 1, n do
    local limit, window, cost = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
    a = a + 3
    local t = redis.call('PTTL', KEYS[k + i - 1])
    if t < 0 then used[i] = 0; ttl[i] = window else used[i] = tonumber(redis.call('GET', KEYS[k + i - 1])); ttl[i] = t end
    if used[i] + cost > limit then
      if cost > limit then return {0, 1, i, window} end
      return {0, 1, i, ttl[i]}
    end
  end
  local out, took = {1, m}, {m}
  local writes = {}
  for j = 1, m do
    local u = KEYS[k + n + j - 1]
    local allowed, reported, amount, period = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
    a = a + 4
    local seen = tonumber(redis.call('HGET', u, 'reported') or '0')
    local mine = tonumber(redis.call('HGET', u, 'local') or '0')
    local stored = tonumber(redis.call('HGET', u, 'period') or '0')
    if period > stored then mine = 0; stored = period end
    if reported > seen then mine = math.max(0, mine - (reported - seen)); seen = reported end
    if seen + mine + amount > allowed then return {0, 2, 0, 0} end
    writes[j] = {u, seen, mine + amount, stored}
    out[#out + 1] = seen + mine + amount
    took[#took + 1] = amount
    took[#took + 1] = stored
  end
  for j = 1, m do
    local w = writes[j]
    redis.call('HSET', w[1], 'reported', w[2], 'local', w[3], 'period', w[4])
  end
  a = a - 3 * n - 4 * m
  for i = 1, n do
    local limit, window, cost = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
    a = a + 3
    local key = KEYS[k + i - 1]
    if used[i] == 0 then redis.call('SET', key, cost, 'PX', window) else redis.call('INCRBY', key, cost) end
    out[#out + 1] = limit - used[i] - cost
    out[#out + 1] = ttl[i]
    took[#took + 1] = cost
    took[#took + 1] = redis.call('PEXPIRETIME', key)
  end
  for i = 1, #took do took[i] = string.format('%d', took[i]) end
  return out, table.concat(took, ',')
end

local results, taken = {}, {}
local k, a, entry = 2, 2, 0
while a <= #ARGV do
  entry = entry + 1
  local n, m = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  a = a + 2
  if cancels and redis.call('HEXISTS', record, entry) == 1 then
    results[entry] = '0,3,0,0'
  else
    local out, took = decide(k, a, n, m)
    -- Numbers as integers: Lua would print 2^53 as 9.007199254741e+15.
    for i = 1, #out do out[i] = string.format('%d', out[i]) end
    results[entry] = table.concat(out, ',')
    if took then taken[#taken + 1] = entry; taken[#taken + 1] = took end
  end
  k = k + n + m
  a = a + 3 * n + 4 * m
end
if #taken > 0 then
  redis.call('HSET', record, unpack(taken))
  redis.call('PEXPIRE', record, ttl_ms)
end
return table.concat(results, ';')
"#;

/// Takes back what DECIDE took for one entry of a batch, from the windows and the refill periods
/// it took it from, or marks the entry so a DECIDE still on its way refuses it.
/// KEYS: the entry's counters, its usage hashes, the batch record.
/// ARGV: the entry's index, the record's lifetime in ms.
pub(super) const CANCEL: &str = r#"
local record, entry = KEYS[#KEYS], ARGV[1]
local took = redis.call('HGET', record, entry)
redis.call('HSET', record, entry, 'x')
redis.call('PEXPIRE', record, ARGV[2])
if (not took) or took == 'x' then return 0 end
local t = {}
for v in string.gmatch(took, '[^,]+') do t[#t + 1] = tonumber(v) end
local m = t[1]
local n = (#t - 1 - 2 * m) / 2
for i = 1, n do
  local cost, expires = t[1 + 2*m + 2*i - 1], t[1 + 2*m + 2*i]
  if redis.call('PEXPIRETIME', KEYS[i]) == expires then
    local left = tonumber(redis.call('GET', KEYS[i]) or '0') - cost
    if left < 0 then left = 0 end
    redis.call('SET', KEYS[i], left, 'KEEPTTL')
  end
end
for j = 1, m do
  local u, amount, period = KEYS[n + j], t[2*j], t[2*j + 1]
  if amount > 0 and tonumber(redis.call('HGET', u, 'period') or '0') == period then
    local mine = tonumber(redis.call('HGET', u, 'local') or '0') - amount
    if mine < 0 then mine = 0 end
    redis.call('HSET', u, 'local', mine)
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
