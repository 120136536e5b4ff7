//! Rate limits and usage shared by every instance, in Redis (feature `redis`).
//!
//! A decision goes one of two ways: exactly, by Redis (`batch`: queued requests go together in
//! one script call), or, in local-first mode, from units this instance reserved ahead (`lease`).
//! Without Redis, the `fallback` decides. The Lua is in `scripts`.

mod batch;
mod fallback;
mod lease;
mod msgpack;
mod scripts;

use super::{LimitError, LimitRequest, LimitVerdict, Limiter, MemoryLimiter, RateLimit, UsageCharge, WallClock};
use crate::boxed::BoxFuture;
use crate::connection::RedisConnection;
use crate::outage::Outage;
use batch::Decision;
use lease::{Leases, Take};
use scripts::{script, Script};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What a [`RedisLimiter`] does when Redis does not answer within its timeout.
///
/// The example runs against the Redis at `REDIS_URL` (and is reported ignored where that is unset).
///
#[cfg_attr(keygate_redis_url, doc = "```rust")]
#[cfg_attr(not(keygate_redis_url), doc = "```rust,ignore")]
#[doc = include_str!("../../../docs/fallback.md")]
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
#[doc = include_str!("../../../docs/redis_limiter.md")]
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
    /// This process's part of batch ids, random so instances never share one.
    instance: u64,
    batches: AtomicU64,
    /// Decisions on their way to Redis.
    queue: batch::Queue,
    /// Local-first mode's reserved units, if it is on.
    leases: Option<Leases>,
    /// What the fallback admitted, per key id, to add to Redis's counters when it answers again.
    debts: Mutex<HashMap<Box<str>, fallback::Debt>>,
    owes: AtomicBool,
    paying: tokio::sync::Mutex<()>,
    /// Whether a task is waiting for Redis to pay the debts.
    payer: AtomicBool,
    /// Per key id, what Redis last said the key had spent of its usage allowance.
    spent: Mutex<HashMap<Box<str>, u128>>,
    /// Redis failing while the local fallback decides, logged as state changes.
    outage: Outage,
    /// The time refills are decided by.
    clock: WallClock,
    timings: crate::observe::RedisLimiterTimings,
}

/// Why Redis gave no decision (then the fallback decides).
enum NoAnswer {
    Timeout(Duration),
    Failed(String),
}

impl NoAnswer {
    fn failed(error: &redis::RedisError) -> Self {
        Self::Failed(format!("Redis: {error}"))
    }

    /// The `outcome` label of `keygate_redis_limiter_duration_seconds`.
    fn outcome(&self) -> &'static str {
        match self {
            Self::Timeout(_) => "timeout",
            Self::Failed(_) => "error",
        }
    }

    fn why(self) -> String {
        match self {
            Self::Timeout(after) => format!("Redis did not answer in {after:?}"),
            Self::Failed(why) => why,
        }
    }
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
            batches: AtomicU64::new(0),
            queue: Mutex::default(),
            leases: None,
            debts: Mutex::default(),
            owes: AtomicBool::new(false),
            paying: tokio::sync::Mutex::new(()),
            payer: AtomicBool::new(false),
            spent: Mutex::default(),
            outage: Outage::new("Redis (rate limits)", "each instance decides its share of the limits locally"),
            clock: WallClock::system(),
            timings: Default::default(),
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
    /// connection losses, at the cost of one small hash per batch of admitted requests for that long.
    #[must_use]
    pub fn reconcile_window(mut self, window: Duration) -> Self {
        self.shared_mut().reconcile_window = window.clamp(Duration::from_secs(1), Duration::from_secs(24 * 3600));
        self
    }

    /// Local-first mode: rate limits are decided in memory, from units this instance reserves in
    /// Redis `reserve` at a time (at most a sixteenth of the limit, at least 1), topped up in the
    /// background when half spent. A request then waits for Redis only when its key's reserve
    /// runs out. Requests that spend a usage allowance are still decided by Redis, exactly.
    ///
    /// **Bounds.** Units are reserved before they are admitted, so all instances together never
    /// admit more than a limit (no overshoot). Units reserved and not used when the window ends
    /// were counted and not admitted: while other instances hold unused units, a request may be
    /// refused up to `instances × min(reserve, limit / 16)` early in a window. A reservation that
    /// Redis granted but whose answer was lost is lost the same way (never admitted).
    #[must_use]
    pub fn local_first(mut self, reserve: u64) -> Self {
        self.shared_mut().leases = Some(Leases::new(reserve));
        self
    }

    /// Decides refill periods by `clock` (default: the system's). Each instance decides by its
    /// own clock and Redis keeps the latest period any has seen, so an allowance refills once per
    /// period, at the earliest instance's boundary.
    #[must_use]
    pub fn clock(mut self, clock: WallClock) -> Self {
        let shared = self.shared_mut();
        shared.local = std::mem::take(&mut shared.local).clock(clock.clone());
        shared.clock = clock;
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

/// Where a key's counters are: under its own id, or with its identity's (one hash tag, so one
/// script decides both on a Cluster).
#[derive(Clone, Copy)]
pub(super) struct Owner<'a> {
    pub(super) key_id: &'a str,
    pub(super) identity: Option<&'a str>,
}

/// A limit's counter: its key name, written straight into the command that needs it (a batch
/// names hundreds) rather than built as a `String` first.
pub(super) enum Counter<'a> {
    /// A key's own counter for a limit (name, size and window: a changed limit is a new counter).
    Key { prefix: &'a str, owner: Owner<'a>, limit: &'a RateLimit },
    /// An identity's counter for a limit's name and window (not its size: see `same_counter`).
    Identity { prefix: &'a str, identity: &'a str, limit: &'a RateLimit },
}

/// The part of a key's names before what they count: its id in a hash tag, or under its identity's.
struct KeyPart<'a>(&'a str, Owner<'a>);

impl std::fmt::Display for KeyPart<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (prefix, Owner { key_id, identity }) = (self.0, self.1);
        match identity {
            None => write!(f, "{prefix}:{{{key_id}}}"),
            Some(identity) => write!(f, "{prefix}:{{{identity}}}:k:{key_id}"),
        }
    }
}

impl std::fmt::Display for Counter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Self::Key { prefix, owner, limit: l } => {
                write!(f, "{}:rl:{}:{}:{}", KeyPart(prefix, owner), l.name(), l.limit(), l.window().as_millis())
            }
            Self::Identity { prefix, identity, limit: l } => {
                write!(f, "{prefix}:{{{identity}}}:id:rl:{}:{}", l.name(), l.window().as_millis())
            }
        }
    }
}

impl Shared {
    /// A key's counter for `l`.
    fn counter(&self, owner: Owner<'_>, l: &RateLimit) -> String {
        Counter::Key { prefix: &self.prefix, owner, limit: l }.to_string()
    }

    fn usage_key(&self, owner: Owner<'_>) -> String {
        format!("{}:usage", KeyPart(&self.prefix, owner))
    }

    fn identity_usage_key(&self, identity: &str) -> String {
        format!("{}:{{{identity}}}:id:usage", self.prefix)
    }

    /// The usage hashes a request charges and their refill periods now: the key's, then its
    /// identity's.
    fn usage_hashes(&self, key_id: &str, request: &LimitRequest<'_>) -> Vec<(String, UsageCharge, u64)> {
        let owner = Owner { key_id, identity: request.identity.map(|i| i.id) };
        // The clock is read only for an allowance that refills.
        let period = |u: &UsageCharge| u.refill.map_or(0, |r| r.period_start(self.clock.now()));
        let mine = request.usage.map(|u| (self.usage_key(owner), u, period(&u)));
        let theirs = request.identity.and_then(|i| Some((self.identity_usage_key(i.id), i.usage?)));
        mine.into_iter().chain(theirs.map(|(key, u)| (key, u, period(&u)))).collect()
    }

    fn ttl_ms(&self) -> u64 {
        self.reconcile_window.as_millis() as u64
    }

    /// Redis's decision (from the leases first, in local-first mode), or the fallback's.
    async fn decide(self: Arc<Self>, decision: Decision) -> Result<LimitVerdict, LimitError> {
        let started = std::time::Instant::now();
        let leased = match &self.leases {
            Some(leases) if decision.usage.is_empty() && decision.identity.is_none() => {
                self.decide_from_leases(leases, &decision.key_id, &decision.limits).await
            }
            _ => Ok(None),
        };
        let decision = Arc::new(decision);
        let answer = match leased {
            Ok(Some(verdict)) => Ok(verdict),
            Ok(None) => self.decide_exact(decision.clone()).await,
            Err(why) => Err(why),
        };
        self.timings.record(answer.as_ref().map_or_else(NoAnswer::outcome, |_| "ok"), started.elapsed());
        match answer {
            Ok(verdict) => {
                self.outage.recovered();
                Ok(verdict)
            }
            Err(no_answer) => self.fall_back(&decision, no_answer.why()),
        }
    }
}

impl Limiter for RedisLimiter {
    fn check_now(&self, key_id: &str, request: &LimitRequest<'_>) -> Option<LimitVerdict> {
        // Usage and identities are decided by Redis, exactly; rate limits of a key alone, from leases.
        let leases = self.shared.leases.as_ref().filter(|_| request.usage.is_none() && request.identity.is_none())?;
        let limits = super::distinct(request.limits);
        match leases.take(key_id, &limits) {
            Take::Taken(states, ahead) => {
                if !ahead.is_empty() {
                    self.shared.reserve_ahead(key_id, ahead);
                }
                Some(Ok(super::per_entry(request.limits, &limits, states)))
            }
            Take::Short(_) => None,
        }
    }

    fn check(&self, key_id: &str, request: &LimitRequest<'_>) -> BoxFuture<'static, Result<LimitVerdict, LimitError>> {
        let shared = self.shared.clone();
        // A limit listed twice is one limit (one key): the script would count it twice.
        let limits = super::distinct(request.limits);
        // Only where a limit repeats are the states given back per entry asked (rare: a copy then).
        let asked = (limits.len() != request.limits.len()).then(|| (request.limits.to_vec(), limits.to_vec()));
        let decision = Decision::new(
            key_id,
            request.identity.map(|i| i.id),
            limits.into_owned(),
            request.identity.map(|i| super::distinct_counters(i.limits).into_owned()).unwrap_or_default(),
            shared.usage_hashes(key_id, request),
            [request.usage, request.identity.and_then(|i| i.usage)],
        );
        Box::pin(async move {
            let verdict = shared.decide(decision).await?;
            Ok(verdict.map(|mut states| match &asked {
                Some((asked, distinct)) => {
                    let theirs = states.split_off(distinct.len());
                    let mut states = super::per_entry(asked, distinct, states);
                    states.extend(theirs);
                    states
                }
                None => states,
            }))
        })
    }

    fn charge(&self, key_id: &str, request: &LimitRequest<'_>) {
        let usage = self.shared.usage_hashes(key_id, request);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        if usage.is_empty() {
            return;
        }
        let shared = self.shared.clone();
        runtime.spawn(async move {
            let mut invocation = script(Script::Reconcile).prepare_invoke();
            invocation.arg(0);
            for (key, charge, period) in &usage {
                invocation.key(key).arg(charge.amount).arg(*period);
            }
            if let Err(error) = shared.conn.write::<i64>(&invocation).await {
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
            .field("local_first", &self.shared.leases.is_some())
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
                    let lua = limiter.check("key", &LimitRequest { limits: &request, usage: None, identity: None }).await.unwrap();
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
