//! Rate limits and usage shared by every instance, in Redis (feature `redis`).

use super::{Denied, LimitError, LimitRequest, LimitState, LimitVerdict, Limiter, MemoryLimiter, RateLimit, Refusal};
use crate::boxed::BoxFuture;
use crate::connection::RedisConnection;
use crate::outage::Outage;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// What a [`RedisLimiter`] does when Redis does not answer within its timeout.
///
/// The example runs against the Redis at `REDIS_URL` (and is reported ignored where that is unset).
///
#[cfg_attr(keygate_redis_url, doc = "```rust")]
#[cfg_attr(not(keygate_redis_url), doc = "```rust,ignore")]
#[doc = include_str!("../../docs/fallback.md")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fallback {
    /// Refuse with `503` and `Retry-After` (the default): no decision without the shared counters.
    FailClosed,
    /// Decide with in-memory counters, each limit (and usage allowance left) divided by the number
    /// of instances, so that together they stay near the shared limit.
    Local {
        /// How many instances share the limits.
        instances: u32,
    },
}

/// Rate limits and usage allowances kept in Redis, so a limit of 500 per minute means 500 across all
/// instances, and a credit balance is spent once.
///
/// The example runs against the Redis at `REDIS_URL` (and is reported ignored where that is unset).
///
#[cfg_attr(keygate_redis_url, doc = "```rust")]
#[cfg_attr(not(keygate_redis_url), doc = "```rust,ignore")]
#[doc = include_str!("../../docs/redis_limiter.md")]
#[derive(Clone)]
pub struct RedisLimiter {
    shared: Arc<Shared>,
}

struct Shared {
    conn: RedisConnection,
    prefix: String,
    timeout: Duration,
    reconcile_window: Duration,
    fallback: Fallback,
    /// The fallback's counters: mirrors of Redis's last answers, scaled to this instance's share.
    local: MemoryLimiter,
    fallbacks: AtomicU64,
    /// This process's part of request ids, random so instances never share one.
    instance: u64,
    ops: AtomicU64,
    /// What the fallback admitted, per key id, to add to Redis's counters when it answers again.
    debts: Mutex<HashMap<Box<str>, Debt>>,
    owes: AtomicBool,
    paying: tokio::sync::Mutex<()>,
    /// Whether a task is waiting for Redis to pay the debts.
    payer: AtomicBool,
    /// Per key id, what Redis last said the key had spent of its usage allowance.
    spent: Mutex<HashMap<Box<str>, u128>>,
    /// Redis failing while the local fallback decides, logged as state changes.
    outage: Outage,
}

#[derive(Default)]
struct Debt {
    limits: Vec<(RateLimit, u64)>,
    usage: u64,
}

/// Decides a request's limits, then its usage; writes only if everything passes, and records what
/// it took under the request's id so a cancel can take it back.
/// KEYS: the limits' counters, the usage hash (if usage), the op key.
/// ARGV: n, then (limit, window_ms, cost) per limit, then (allowed, reported, amount) if usage, then
/// the op record's lifetime in ms.
/// Returns {1, spent or -1, remaining, ttl, …} or {0, kind (1 rate, 2 usage, 3 cancelled), index, wait_ms}.
const DECIDE: &str = r#"
local n = tonumber(ARGV[1])
local op = KEYS[#KEYS]
if redis.call('EXISTS', op) == 1 then return {0, 3, 0, 0} end
local used, ttl = {}, {}
for i = 1, n do
  local limit, window, cost = tonumber(ARGV[3*i-1]), tonumber(ARGV[3*i]), tonumber(ARGV[3*i+1])
  local t = redis.call('PTTL', KEYS[i])
  if t < 0 then used[i] = 0; ttl[i] = window else used[i] = tonumber(redis.call('GET', KEYS[i])); ttl[i] = t end
  if used[i] + cost > limit then
    if cost > limit then return {0, 1, i, window} end
    return {0, 1, i, ttl[i]}
  end
end
local spent, amount = -1, 0
if #KEYS > n + 1 then
  local u = KEYS[n + 1]
  local allowed, reported = tonumber(ARGV[3*n+2]), tonumber(ARGV[3*n+3])
  amount = tonumber(ARGV[3*n+4])
  local seen = tonumber(redis.call('HGET', u, 'reported') or '0')
  local mine = tonumber(redis.call('HGET', u, 'local') or '0')
  if reported > seen then mine = math.max(0, mine - (reported - seen)); seen = reported end
  if seen + mine + amount > allowed then return {0, 2, 0, 0} end
  redis.call('HSET', u, 'reported', seen, 'local', mine + amount)
  spent = seen + mine + amount
end
local out, took = {1, spent}, {amount}
for i = 1, n do
  local limit, window, cost = tonumber(ARGV[3*i-1]), tonumber(ARGV[3*i]), tonumber(ARGV[3*i+1])
  if used[i] == 0 then redis.call('SET', KEYS[i], cost, 'PX', window) else redis.call('INCRBY', KEYS[i], cost) end
  out[#out + 1] = limit - used[i] - cost
  out[#out + 1] = ttl[i]
  took[#took + 1] = cost
  took[#took + 1] = redis.call('PEXPIRETIME', KEYS[i])
end
redis.call('SET', op, table.concat(took, ','), 'PX', ARGV[#ARGV])
return out
"#;

/// Takes back what DECIDE took for a request id, from the windows it took it from, or marks the id
/// so a DECIDE still on its way refuses. Same KEYS as DECIDE; ARGV: the op marker's lifetime in ms.
const CANCEL: &str = r#"
local op = KEYS[#KEYS]
local record = redis.call('GET', op)
redis.call('SET', op, 'x', 'PX', ARGV[1])
if (not record) or record == 'x' then return 0 end
local took = {}
for v in string.gmatch(record, '[^,]+') do took[#took + 1] = tonumber(v) end
local amount = took[1]
local n = (#took - 1) / 2
for i = 1, n do
  local cost, expires = took[2*i], took[2*i+1]
  if redis.call('PEXPIRETIME', KEYS[i]) == expires then
    local left = tonumber(redis.call('GET', KEYS[i]) or '0') - cost
    if left < 0 then left = 0 end
    redis.call('SET', KEYS[i], left, 'KEEPTTL')
  end
end
if amount > 0 and #KEYS > n + 1 then
  local mine = tonumber(redis.call('HGET', KEYS[n + 1], 'local') or '0') - amount
  if mine < 0 then mine = 0 end
  redis.call('HSET', KEYS[n + 1], 'local', mine)
end
return 1
"#;

/// Adds what the fallback admitted to the shared counters: to each window still open, and to the
/// usage balance. KEYS: the limits' counters, the usage hash. ARGV: n, the costs, the usage amount.
const RECONCILE: &str = r#"
local n = tonumber(ARGV[1])
for i = 1, n do
  if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('INCRBY', KEYS[i], tonumber(ARGV[i + 1])) end
end
local amount = tonumber(ARGV[n + 2])
if amount > 0 then redis.call('HINCRBY', KEYS[n + 1], 'local', amount) end
return 1
"#;

fn script(which: usize) -> &'static redis::Script {
    static SCRIPTS: [OnceLock<redis::Script>; 3] = [const { OnceLock::new() }; 3];
    SCRIPTS[which].get_or_init(|| redis::Script::new([DECIDE, CANCEL, RECONCILE][which]))
}

/// Lua numbers are doubles: amounts above 2^53 are clamped, not wrapped.
fn lua_number(n: u128) -> u64 {
    n.min(1 << 53) as u64
}

impl RedisLimiter {
    /// A limiter on `conn`, with its keys under `prefix`.
    #[must_use]
    pub fn new(conn: RedisConnection, prefix: &str) -> Self {
        let mut seed = [0u8; 8];
        // Without entropy, the clock still separates instances started apart.
        let instance = getrandom::fill(&mut seed).map_or_else(
            |_| {
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos() as u64
            },
            |()| u64::from_le_bytes(seed),
        );
        let shared = Shared {
            conn,
            prefix: prefix.to_owned(),
            timeout: Duration::from_millis(50),
            reconcile_window: Duration::from_secs(10),
            fallback: Fallback::FailClosed,
            local: MemoryLimiter::new(),
            fallbacks: AtomicU64::new(0),
            instance,
            ops: AtomicU64::new(0),
            debts: Mutex::default(),
            owes: AtomicBool::new(false),
            paying: tokio::sync::Mutex::new(()),
            payer: AtomicBool::new(false),
            spent: Mutex::default(),
            outage: Outage::new("Redis (rate limits)", "each instance decides its share of the limits locally"),
        };
        Self { shared: Arc::new(shared) }
    }

    /// How long a decision may wait for Redis (default 50 ms).
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.shared_mut().timeout = timeout;
        self
    }

    /// What to do when Redis does not answer (default [`Fallback::FailClosed`]).
    #[must_use]
    pub fn fallback(mut self, fallback: Fallback) -> Self {
        self.shared_mut().fallback = fallback;
        self
    }

    /// How long Redis keeps the record of what an admitted request took, so that a request this
    /// instance gave up on can be taken back (default 10 s, at least 1 s). Longer covers longer
    /// connection losses, at the cost of one small key per admitted request for that long.
    #[must_use]
    pub fn reconcile_window(mut self, window: Duration) -> Self {
        self.shared_mut().reconcile_window = window.clamp(Duration::from_secs(1), Duration::from_secs(24 * 3600));
        self
    }

    /// How many decisions were made by the fallback.
    #[must_use]
    pub fn fallbacks(&self) -> u64 {
        self.shared.fallbacks.load(Ordering::Relaxed)
    }

    fn shared_mut(&mut self) -> &mut Shared {
        Arc::get_mut(&mut self.shared).expect("configured before it is shared")
    }
}

impl Shared {
    fn counter(&self, key_id: &str, l: &RateLimit) -> String {
        format!("{}:{{{key_id}}}:rl:{}:{}:{}", self.prefix, l.name(), l.limit(), l.window().as_millis())
    }

    fn usage_key(&self, key_id: &str) -> String {
        format!("{}:{{{key_id}}}:usage", self.prefix)
    }

    /// The keys of DECIDE and CANCEL, all in the key id's hash slot.
    fn keys(&self, key_id: &str, request: &LimitRequest<'_>, op: u64) -> Vec<String> {
        let mut keys: Vec<String> = request.limits.iter().map(|(l, _)| self.counter(key_id, l)).collect();
        if request.usage.is_some() {
            keys.push(self.usage_key(key_id));
        }
        keys.push(format!("{}:{{{key_id}}}:op:{:x}.{op:x}", self.prefix, self.instance));
        keys
    }

    fn ttl_ms(&self) -> u64 {
        self.reconcile_window.as_millis() as u64
    }

    async fn decide(&self, key_id: &str, request: &LimitRequest<'_>, op: u64) -> redis::RedisResult<LimitVerdict> {
        let mut invocation = script(0).prepare_invoke();
        for key in self.keys(key_id, request, op) {
            invocation.key(key);
        }
        invocation.arg(request.limits.len());
        for (limit, cost) in request.limits {
            invocation.arg(limit.limit()).arg(limit.window().as_millis().max(1) as u64).arg(*cost);
        }
        if let Some(u) = request.usage {
            invocation.arg(lua_number(u.allowed)).arg(lua_number(u.reported)).arg(u.amount);
        }
        invocation.arg(self.ttl_ms());
        let reply: Vec<i64> = self.conn.write(&invocation).await?;
        let ms = |v: i64| Duration::from_millis(v.max(0) as u64);
        Ok(match reply.as_slice() {
            [1, spent, rest @ ..] => {
                let states: Vec<LimitState> = request
                    .limits
                    .iter()
                    .zip(rest.chunks_exact(2))
                    .map(|((limit, _), r)| LimitState {
                        limit: limit.clone(),
                        remaining: r[0].max(0) as u64,
                        reset: ms(r[1]),
                    })
                    .collect();
                self.remember(key_id, &states, u128::try_from(*spent).ok());
                Ok(states)
            }
            [0, 1, i, wait] => {
                let limit = request.limits[(*i as usize).saturating_sub(1)].0.clone();
                Err(Refusal::Rate(Denied { limit, retry_after: ms(*wait) }))
            }
            [0, 2, ..] => Err(Refusal::Usage),
            other => {
                return Err(
                    (redis::ErrorKind::UnexpectedReturnType, "unexpected limiter reply", format!("{other:?}")).into()
                )
            }
        })
    }

    /// Takes back whatever the decision `op` took, or stops it from taking anything. Retried until
    /// Redis answers or the reconcile window has passed (the record is gone by then).
    async fn cancel(self: Arc<Self>, key_id: String, limits: Vec<(RateLimit, u64)>, usage: bool, op: u64) {
        let request = LimitRequest {
            limits: &limits,
            usage: usage.then_some(super::UsageCharge { allowed: 0, reported: 0, amount: 0 }),
        };
        let keys = self.keys(&key_id, &request, op);
        let give_up = tokio::time::Instant::now() + self.reconcile_window;
        let mut wait = Duration::from_millis(20);
        loop {
            let mut invocation = script(1).prepare_invoke();
            for key in &keys {
                invocation.key(key);
            }
            invocation.arg(self.ttl_ms());
            let done: redis::RedisResult<i64> = invocation.invoke_async(&mut self.conn.clone()).await;
            match done {
                Ok(_) => return,
                Err(error) if tokio::time::Instant::now() + wait >= give_up => {
                    tracing::error!(%error, key_id, "keygate: could not cancel a decision Redis may have counted");
                    return;
                }
                Err(_) => {
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// With a local fallback, mirrors Redis's answer into this instance's share of each limit and
    /// balance, so the fallback starts from what Redis said was left.
    fn remember(&self, key_id: &str, states: &[LimitState], spent: Option<u128>) {
        let Fallback::Local { instances } = self.fallback else { return };
        let n = u64::from(instances.max(1));
        let shares: Vec<(RateLimit, u64, Duration)> = states
            .iter()
            .map(|s| {
                let share = share(&s.limit, n);
                let left = (s.remaining / n).min(share.limit());
                (share.clone(), share.limit() - left, s.reset)
            })
            .collect();
        self.local.mirror(key_id, &shares);
        if let Some(spent) = spent {
            let mut known = crate::lock::lock(&self.spent);
            match known.get_mut(key_id) {
                Some(known) => *known = spent,
                None => drop(known.insert(key_id.into(), spent)),
            }
        }
    }

    /// The fallback's decision, counted; what it admits is owed to the shared counters.
    fn fall_back(&self, key_id: &str, request: &LimitRequest<'_>, why: String) -> Result<LimitVerdict, LimitError> {
        self.fallbacks.fetch_add(1, Ordering::Relaxed);
        let Fallback::Local { instances } = self.fallback else {
            crate::observe::limiter_fallback("fail_closed");
            return Err(LimitError::new(why));
        };
        crate::observe::limiter_fallback("local");
        // Failing closed, the gate says so (its 503s); falling back, this is the only word of it.
        self.outage.failed(&why);
        tracing::debug!(%why, "keygate: Redis unavailable; deciding with local limits");
        let n = u64::from(instances.max(1));
        let limits: Vec<(RateLimit, u64)> = request.limits.iter().map(|(l, cost)| (share(l, n), *cost)).collect();
        let usage = request.usage.map(|mut u| {
            let spent = crate::lock::lock(&self.spent).get(key_id).copied();
            let spent = spent.unwrap_or(0).max(u.reported);
            // This instance's share of what was left, counted from zero by the local ledger.
            u.allowed = u.allowed.saturating_sub(spent) / u128::from(n);
            u.reported = 0;
            u
        });
        let verdict =
            self.local.check_now(key_id, &LimitRequest { limits: &limits, usage }).expect("memory decides now");
        if verdict.is_ok() {
            let mut debts = crate::lock::lock(&self.debts);
            let debt = debts.entry(key_id.into()).or_default();
            for (limit, cost) in request.limits {
                match debt.limits.iter_mut().find(|(l, _)| l == limit) {
                    Some((_, owed)) => *owed = owed.saturating_add(*cost),
                    None => debt.limits.push((limit.clone(), *cost)),
                }
            }
            debt.usage = debt.usage.saturating_add(request.usage.map_or(0, |u| u.amount));
            self.owes.store(true, Ordering::Release);
        }
        Ok(verdict)
    }

    /// Pays the debts as soon as Redis answers again, whether or not this instance gets requests:
    /// other instances' decisions must see what this one admitted.
    async fn pay_when_back(self: Arc<Self>) {
        let mut wait = Duration::from_millis(50);
        loop {
            while self.owes.load(Ordering::Acquire) {
                tokio::time::sleep(wait).await;
                let paid = tokio::time::timeout(self.timeout.max(Duration::from_millis(200)), self.pay_debts()).await;
                if !matches!(paid, Ok(Ok(()))) {
                    wait = (wait * 2).min(Duration::from_secs(1));
                }
            }
            self.payer.store(false, Ordering::Release);
            // A debt added just as this task stopped started no payer of its own: look once more.
            if !self.owes.load(Ordering::Acquire) || self.payer.swap(true, Ordering::AcqRel) {
                return;
            }
        }
    }

    /// Adds what the fallback admitted to Redis's counters. A debt leaves the books only once Redis
    /// has taken it, so a payment cut off by the timeout is paid again later (it may then count
    /// twice: the safe side for a limit). One payer at a time; the others do not wait for it.
    async fn pay_debts(&self) -> redis::RedisResult<()> {
        if !self.owes.load(Ordering::Acquire) {
            return Ok(());
        }
        let Ok(_paying) = self.paying.try_lock() else { return Ok(()) };
        let owed: Vec<(Box<str>, Debt)> = {
            let debts = crate::lock::lock(&self.debts);
            debts.iter().map(|(id, d)| (id.clone(), Debt { limits: d.limits.clone(), usage: d.usage })).collect()
        };
        for (key_id, Debt { limits, usage }) in owed {
            let mut invocation = script(2).prepare_invoke();
            for (limit, _) in &limits {
                invocation.key(self.counter(&key_id, limit));
            }
            invocation.key(self.usage_key(&key_id));
            invocation.arg(limits.len());
            for (_, cost) in &limits {
                invocation.arg(*cost);
            }
            invocation.arg(usage);
            self.conn.write::<i64>(&invocation).await?;
            // Paid: off the books, less anything the fallback admitted meanwhile.
            let mut debts = crate::lock::lock(&self.debts);
            if let Some(debt) = debts.get_mut(&key_id) {
                for (limit, paid) in &limits {
                    if let Some((_, c)) = debt.limits.iter_mut().find(|(l, _)| l == limit) {
                        *c = c.saturating_sub(*paid);
                    }
                }
                debt.limits.retain(|(_, c)| *c > 0);
                debt.usage = debt.usage.saturating_sub(usage);
                if debt.limits.is_empty() && debt.usage == 0 {
                    debts.remove(&key_id);
                }
            }
            // Redis counts the fallback's usage now: the local share starts again from its word.
            self.local.forget_usage(&key_id);
        }
        let mut debts = crate::lock::lock(&self.debts);
        if debts.is_empty() {
            self.owes.store(false, Ordering::Release);
        }
        debts.shrink_to_fit();
        Ok(())
    }
}

/// One instance's share of a limit.
fn share(limit: &RateLimit, instances: u64) -> RateLimit {
    if instances <= 1 {
        return limit.clone();
    }
    RateLimit::new(limit.name(), (limit.limit() / instances).max(1), limit.window()).unwrap_or_else(|_| limit.clone())
}

impl Limiter for RedisLimiter {
    fn check(&self, key_id: &str, request: &LimitRequest<'_>) -> BoxFuture<'static, Result<LimitVerdict, LimitError>> {
        let shared = self.shared.clone();
        // A limit listed twice is one limit (one key): the script would count it twice.
        let limits = super::distinct(request.limits);
        let asked = (limits.len() != request.limits.len()).then(|| request.limits.to_vec());
        let (key_id, limits, usage) = (key_id.to_owned(), limits.into_owned(), request.usage);
        let op = shared.ops.fetch_add(1, Ordering::Relaxed);
        Box::pin(async move {
            let request = LimitRequest { limits: &limits, usage };
            // What a fallback admitted is added to the shared counters before Redis decides again.
            let decided = async {
                shared.pay_debts().await?;
                shared.decide(&key_id, &request, op).await
            };
            let started = std::time::Instant::now();
            let answer = tokio::time::timeout(shared.timeout, decided).await;
            let outcome = match &answer {
                Ok(Ok(_)) => "ok",
                Ok(Err(_)) => "error",
                Err(_) => "timeout",
            };
            crate::observe::redis_limiter(outcome, started.elapsed());
            let why = match answer {
                Ok(Ok(verdict)) => {
                    shared.outage.recovered();
                    return Ok(verdict.map(|states| match &asked {
                        Some(asked) => super::per_entry(asked, &limits, states),
                        None => states,
                    }));
                }
                Ok(Err(error)) => format!("Redis: {error}"),
                Err(_) => format!("Redis did not answer in {:?}", shared.timeout),
            };
            // The script may run late, or may have run and lost its answer: take it back.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(shared.clone().cancel(key_id.clone(), limits.clone(), usage.is_some(), op));
            }
            let verdict = shared.fall_back(&key_id, &request, why);
            if shared.owes.load(Ordering::Acquire) && !shared.payer.swap(true, Ordering::AcqRel) {
                tokio::spawn(shared.clone().pay_when_back());
            }
            verdict
        })
    }

    fn charge(&self, key_id: &str, amount: u64) {
        let (shared, key) = (self.shared.clone(), self.shared.usage_key(key_id));
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        runtime.spawn(async move {
            let mut conn = shared.conn.clone();
            let added: redis::RedisResult<i64> =
                redis::cmd("HINCRBY").arg(&key).arg("local").arg(amount).query_async(&mut conn).await;
            if let Err(error) = added {
                tracing::warn!(%error, "keygate: could not count usage in Redis");
            }
        });
    }
}

impl std::fmt::Debug for RedisLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLimiter")
            .field("prefix", &self.shared.prefix)
            .field("timeout", &self.shared.timeout)
            .field("fallback", &self.shared.fallback)
            .finish_non_exhaustive()
    }
}

/// The Lua `DECIDE` script and the pure algorithm in [`super::window`] agree, step by step, on a
/// real Redis. Redis's clock is its key expiry, so time is simulated there by shortening every
/// counter's TTL by the step; steps and windows are whole multiples of 500 ms so the few
/// milliseconds that really pass between steps can never cross a window's end.
#[cfg(test)]
mod parity {
    use super::super::window::{self, Check, Window};
    use super::super::{LimitRequest, Limiter, RateLimit, Refusal};
    use super::RedisLimiter;
    use proptest::prelude::*;
    use std::time::Duration;

    const TICK: u64 = 500;

    /// Moves Redis's clock for the counters under `prefix` forward by `ms`.
    async fn advance(conn: &mut crate::RedisConnection, prefix: &str, ms: u64) {
        let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}:*")).query_async(conn).await.unwrap();
        for key in keys {
            let ttl: i64 = redis::cmd("PTTL").arg(&key).query_async(conn).await.unwrap();
            if ttl <= 0 {
                continue;
            }
            let left = ttl - ms as i64;
            let cmd = if left <= 0 {
                redis::cmd("DEL").arg(&key).clone()
            } else {
                redis::cmd("PEXPIRE").arg(&key).arg(left).clone()
            };
            let _: i64 = cmd.query_async(conn).await.unwrap();
        }
    }

    fn limits() -> impl Strategy<Value = Vec<RateLimit>> {
        let one = (1u64..6, 1u64..5).prop_map(|(n, ticks)| (n, ticks));
        prop::collection::vec(one, 1..4).prop_map(|ls| {
            ls.into_iter()
                .enumerate()
                .map(|(i, (n, ticks))| {
                    RateLimit::new(&format!("l{i}"), n, Duration::from_millis(ticks * TICK)).unwrap()
                })
                .collect()
        })
    }

    /// Steps: ticks to advance, which of the limits the request names (a bit mask), its cost.
    fn steps() -> impl Strategy<Value = Vec<(u64, u8, u64)>> {
        prop::collection::vec((0u64..4, 1u8..8, 1u64..4), 1..25)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        #[cfg_attr(not(keygate_redis_url), ignore = "needs REDIS_URL")]
        fn the_lua_script_decides_as_the_pure_algorithm(limits in limits(), steps in steps()) {
            let url = std::env::var("REDIS_URL").expect("REDIS_URL is set (this test is ignored otherwise)");
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let mut conn = crate::RedisConnection::open(&url).unwrap();
                let mut seed = [0u8; 8];
                getrandom::fill(&mut seed).unwrap();
                let prefix = format!("kgparity:{:x}", u64::from_le_bytes(seed));
                let limiter = RedisLimiter::new(conn.clone(), &prefix).timeout(Duration::from_secs(5));
                let mut model: Vec<Option<Window>> = vec![None; limits.len()];
                let mut now = 0u128;
                for (i, (ticks, mask, cost)) in steps.iter().enumerate() {
                    advance(&mut conn, &prefix, ticks * TICK).await;
                    now += u128::from(ticks * TICK);
                    let asked: Vec<usize> = (0..limits.len()).filter(|j| mask & (1 << j) != 0).collect();
                    let request: Vec<(RateLimit, u64)> = asked.iter().map(|&j| (limits[j].clone(), *cost)).collect();
                    // The pure algorithm: every limit checked, then all taken or none.
                    let checks: Vec<Check> = asked
                        .iter()
                        .map(|&j| {
                            let length = limits[j].window().as_millis();
                            window::check(window::current(model[j], now), limits[j].limit(), length, *cost, now)
                        })
                        .collect();
                    let refused = asked.iter().zip(&checks).find_map(|(&j, c)| match c {
                        Check::Exceeds { retry_after } => Some((j, *retry_after)),
                        Check::Fits { .. } => None,
                    });
                    if refused.is_none() {
                        for &j in &asked {
                            let open = window::current(model[j], now);
                            model[j] = Some(window::take(open, limits[j].window().as_millis(), *cost, now));
                        }
                    }
                    let lua = limiter.check("key", &LimitRequest { limits: &request, usage: None }).await.unwrap();
                    match (lua, refused) {
                        (Ok(states), None) => {
                            for (state, check) in states.iter().zip(&checks) {
                                let Check::Fits { remaining, reset } = *check else { unreachable!() };
                                prop_assert_eq!(state.remaining, remaining, "step {}", i);
                                let drift = (state.reset.as_millis() as i128 - reset as i128).abs();
                                prop_assert!(drift < i128::from(TICK as u32) , "step {}: reset {:?} vs {}", i, state.reset, reset);
                            }
                        }
                        (Err(Refusal::Rate(denied)), Some((j, retry_after))) => {
                            prop_assert_eq!(&denied.limit, &limits[j], "step {}: refused by another limit", i);
                            let drift = (denied.retry_after.as_millis() as i128 - retry_after as i128).abs();
                            prop_assert!(drift < i128::from(TICK as u32), "step {}: retry {:?} vs {}", i, denied.retry_after, retry_after);
                        }
                        (lua, pure) => prop_assert!(false, "step {}: Lua {:?}, pure {:?}", i, lua, pure),
                    }
                }
                let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}:*")).query_async(&mut conn).await.unwrap();
                if !keys.is_empty() {
                    let _: i64 = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await.unwrap();
                }
                Ok(())
            })?;
        }
    }
}
