//! The in-memory limiter: fixed windows anchored at each key's first request.

use super::{Denied, LimitRequest, LimitState, LimitVerdict, Limiter, RateLimit, Refusal};
use crate::usage::Ledger;
use crate::verify::BoxFuture;
use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;
use tokio::time::Instant;

const SHARDS: usize = 16;

/// A fixed-window counter per key id and limit.
///
/// **Algorithm.** A key's window for a limit opens at its first request and lasts `window`; up to
/// `limit` cost units pass in it, then requests are refused until it ends, with `Retry-After` the
/// time left in it (the next free slot, exactly). So `500 per minute` means at most 500 in each of
/// the key's windows, never more, however fast or concurrent the requests; a client that spends its
/// quota at the very end of one window and the start of the next can pass `2 × limit` across that
/// edge. (GCRA, the smoother choice, lets a limit's worth through and then refills steadily, so
/// 500/min admits more than 500 in a busy minute; this crate's contract is the stricter one.)
///
/// **State.** One entry per key id holding its limits' windows, in 16 mutex-guarded shards; all of
/// a key's limits are decided under one lock, so a request refused by one limit consumes nothing
/// from the others. Entries whose windows have all ended carry no information and are swept as new
/// keys arrive, so memory shrinks when keys go idle. Time comes from tokio's clock, so tests can
/// pause it.
///
/// ```
/// use keygate::limit::{LimitRequest, Limiter, MemoryLimiter, RateLimit};
/// let limiter = MemoryLimiter::new();
/// let limit = RateLimit::per_minute("default", 2).unwrap();
/// let check = || limiter.check_now("key_1", &LimitRequest { limits: &[(limit.clone(), 1)], usage: None }).unwrap();
/// assert!(check().is_ok());
/// assert_eq!(check().unwrap()[0].remaining, 0);
/// assert!(check().is_err());
/// ```
pub struct MemoryLimiter {
    origin: Instant,
    shards: [Mutex<Shard>; SHARDS],
    /// Usage counted against allowances.
    ledger: Ledger,
}

#[derive(Default)]
struct Shard {
    keys: HashMap<Box<str>, Vec<Window>>,
    /// Keys added since the last sweep, and how many were left by it.
    added: usize,
    after_sweep: usize,
}

struct Window {
    limit: RateLimit,
    /// When it opened, in nanoseconds since `origin`.
    start: u128,
    used: u64,
}

impl Window {
    fn end(&self) -> u128 {
        self.start + self.limit.window().as_nanos()
    }
}

impl Shard {
    fn sweep(&mut self, now: u128) {
        self.keys.retain(|_, windows| windows.iter().any(|w| w.end() > now));
        self.added = 0;
        self.after_sweep = self.keys.len();
    }
}

impl Default for MemoryLimiter {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryLimiter {
    /// An empty limiter.
    pub fn new() -> Self {
        Self { origin: Instant::now(), shards: std::array::from_fn(|_| Mutex::default()), ledger: Ledger::default() }
    }

    /// How many key ids have state. Idle keys are swept as new keys arrive; [`sweep`](Self::sweep)
    /// does it now.
    pub fn key_count(&self) -> usize {
        self.shards.iter().map(|s| lock(s).keys.len()).sum()
    }

    /// Drops the state of keys whose windows have all ended.
    pub fn sweep(&self) {
        let now = self.now();
        self.shards.iter().for_each(|s| lock(s).sweep(now));
    }

    fn now(&self) -> u128 {
        Instant::now().saturating_duration_since(self.origin).as_nanos()
    }

    fn shard(&self, key_id: &str) -> &Mutex<Shard> {
        let mut h = DefaultHasher::new();
        key_id.hash(&mut h);
        &self.shards[h.finish() as usize % SHARDS]
    }

    fn decide(&self, key_id: &str, request: &LimitRequest<'_>) -> LimitVerdict {
        // A limit listed twice is one limit: deciding it twice would count the request twice.
        let limits = super::distinct(request.limits);
        let states = self.decide_distinct(key_id, &limits, request)?;
        Ok(super::per_entry(request.limits, &limits, states))
    }

    fn decide_distinct(&self, key_id: &str, limits: &[(RateLimit, u64)], request: &LimitRequest<'_>) -> LimitVerdict {
        if limits.is_empty() {
            return self.take_usage(key_id, request).map(|()| Vec::new());
        }
        let now = self.now();
        let mut shard = lock(self.shard(key_id));
        let empty = Vec::new();
        let windows = shard.keys.get(key_id).unwrap_or(&empty);
        // First decide every limit, then consume: all or nothing.
        let mut states = Vec::with_capacity(limits.len());
        for (limit, cost) in limits {
            let open = windows.iter().find(|w| w.limit == *limit && w.end() > now);
            let (used, end) = open.map_or((0, now + limit.window().as_nanos()), |w| (w.used, w.end()));
            let left = limit.limit().saturating_sub(used);
            if *cost > left {
                // A cost above the whole limit never passes; say so with a full window.
                let wait = if *cost > limit.limit() { limit.window().as_nanos() } else { end - now };
                return Err(Refusal::Rate(Denied { limit: limit.clone(), retry_after: nanos(wait) }));
            }
            states.push(LimitState { limit: limit.clone(), remaining: left - cost, reset: nanos(end - now) });
        }
        // Usage last: under the shard lock, so a refusal here leaves every window as it was.
        self.take_usage(key_id, request)?;
        // One lookup for a known key; only a new key allocates its id.
        let is_new = match shard.keys.get_mut(key_id) {
            Some(windows) => {
                consume(windows, limits, now);
                false
            }
            None => {
                let mut windows = Vec::with_capacity(limits.len());
                consume(&mut windows, limits, now);
                shard.keys.insert(key_id.into(), windows);
                true
            }
        };
        if is_new {
            shard.added += 1;
            // Amortised: a sweep costs the shard's size, and runs once that many keys were added.
            if shard.added >= shard.after_sweep.max(64) {
                shard.sweep(now);
            }
        }
        Ok(states)
    }
}

impl MemoryLimiter {
    /// Sets `key_id`'s windows to what another counter (Redis) last said: for each limit, what is
    /// used and the time left in its window. The Redis limiter's fallback starts from this.
    #[cfg(feature = "redis")]
    pub(crate) fn mirror(&self, key_id: &str, windows: &[(RateLimit, u64, Duration)]) {
        let now = self.now();
        let mut shard = lock(self.shard(key_id));
        if !shard.keys.contains_key(key_id) {
            shard.keys.insert(key_id.into(), Vec::with_capacity(windows.len()));
        }
        let Some(entry) = shard.keys.get_mut(key_id) else { return };
        for (limit, used, reset) in windows {
            let start = (now + reset.as_nanos()).saturating_sub(limit.window().as_nanos());
            match entry.iter_mut().find(|w| w.limit == *limit) {
                Some(w) => (w.start, w.used) = (start, *used),
                None => entry.push(Window { limit: limit.clone(), start, used: *used }),
            }
        }
    }

    /// Forgets the usage counted for `key_id` (it was handed to another counter).
    #[cfg(feature = "redis")]
    pub(crate) fn forget_usage(&self, key_id: &str) {
        self.ledger.forget(key_id);
    }

    fn take_usage(&self, key_id: &str, request: &LimitRequest<'_>) -> Result<(), Refusal> {
        match request.usage {
            Some(u) if !self.ledger.reserve(key_id, (u.allowed, u.reported), u.amount) => Err(Refusal::Usage),
            _ => Ok(()),
        }
    }
}

/// Takes each limit's cost from its window, opening a new window where the last one ended.
fn consume(windows: &mut Vec<Window>, limits: &[(RateLimit, u64)], now: u128) {
    for (limit, cost) in limits {
        match windows.iter_mut().find(|w| w.limit == *limit) {
            Some(w) if w.end() > now => w.used += cost,
            Some(w) => *w = Window { limit: limit.clone(), start: now, used: *cost },
            None => windows.push(Window { limit: limit.clone(), start: now, used: *cost }),
        }
    }
}

fn lock(m: &Mutex<Shard>) -> std::sync::MutexGuard<'_, Shard> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn nanos(n: u128) -> Duration {
    Duration::from_nanos(n.min(u64::MAX as u128) as u64)
}

impl Limiter for MemoryLimiter {
    fn check_now(&self, key_id: &str, request: &LimitRequest<'_>) -> Option<LimitVerdict> {
        Some(self.decide(key_id, request))
    }

    fn check(
        &self,
        key_id: &str,
        request: &LimitRequest<'_>,
    ) -> BoxFuture<'static, Result<LimitVerdict, super::LimitError>> {
        let verdict = self.decide(key_id, request);
        Box::pin(async move { Ok(verdict) })
    }

    fn charge(&self, key_id: &str, amount: u64) {
        self.ledger.charge(key_id, amount);
    }
}

impl std::fmt::Debug for MemoryLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryLimiter").field("keys", &self.key_count()).finish()
    }
}
