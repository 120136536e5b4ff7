//! The in-memory limiter: fixed windows anchored at each key's first request.

use super::ledger::Ledger;
use super::window::{self, Check, Window};
use super::{Denied, LimitRequest, LimitState, LimitVerdict, Limiter, RateLimit, Refusal};
use crate::boxed::BoxFuture;
use crate::fnv::FnvState;
use crate::lock::lock;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

const SHARDS: usize = 16;

#[doc = include_str!("../../docs/memory_limiter.md")]
pub struct MemoryLimiter {
    origin: Instant,
    shards: [Mutex<Shard>; SHARDS],
    /// Usage counted against allowances.
    ledger: Ledger,
}

#[derive(Default)]
struct Shard {
    /// By key id: only verified keys reach the limiter, so their ids are trusted (see `fnv`).
    keys: HashMap<Box<str>, Vec<Slot>, FnvState>,
    /// Keys added since the last sweep, and how many were left by it.
    added: usize,
    after_sweep: usize,
}

/// One limit's last window for a key, in nanoseconds since `origin`.
struct Slot {
    limit: RateLimit,
    window: Window,
}

impl Shard {
    fn sweep(&mut self, now: u128) {
        self.keys.retain(|_, slots| slots.iter().any(|s| s.window.end > now));
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
    #[must_use]
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
        // Bits 32.., which the map inside the shard does not read (hashbrown takes its bucket from
        // the low bits and its tag from the top 7), so sharding leaves both spread.
        &self.shards[(FnvState::default().hash_one(key_id) >> 32) as usize % SHARDS]
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
        let mut guard = lock(self.shard(key_id));
        let shard = &mut *guard;
        // One lookup for a known key; only a new key allocates its id.
        let known = shard.keys.get_mut(key_id);
        let slots: &[Slot] = known.as_deref().map_or(&[], |s| s.as_slice());
        // First decide every limit, then consume: all or nothing.
        let mut states = Vec::with_capacity(limits.len());
        for (limit, cost) in limits {
            let open = window::current(last_window(slots, limit), now);
            match window::check(open, limit.limit(), limit.window().as_nanos(), *cost, now) {
                Check::Fits { remaining, reset } => {
                    states.push(LimitState { limit: limit.clone(), remaining, reset: nanos(reset) });
                }
                Check::Exceeds { retry_after } => {
                    return Err(Refusal::Rate(Denied { limit: limit.clone(), retry_after: nanos(retry_after) }));
                }
            }
        }
        // Usage last: under the shard lock, so a refusal here leaves every window as it was.
        self.take_usage(key_id, request)?;
        let is_new = match known {
            Some(slots) => {
                consume(slots, limits, now);
                false
            }
            None => {
                let mut slots = Vec::with_capacity(limits.len());
                consume(&mut slots, limits, now);
                shard.keys.insert(key_id.into(), slots);
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
            let window = Window { used: *used, end: now + reset.as_nanos() };
            match entry.iter_mut().find(|s| s.limit == *limit) {
                Some(s) => s.window = window,
                None => entry.push(Slot { limit: limit.clone(), window }),
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
fn consume(slots: &mut Vec<Slot>, limits: &[(RateLimit, u64)], now: u128) {
    for (limit, cost) in limits {
        let length = limit.window().as_nanos();
        match slots.iter_mut().find(|s| s.limit == *limit) {
            Some(s) => s.window = window::take(window::current(Some(s.window), now), length, *cost, now),
            None => slots.push(Slot { limit: limit.clone(), window: window::take(None, length, *cost, now) }),
        }
    }
}

fn last_window(slots: &[Slot], limit: &RateLimit) -> Option<Window> {
    slots.iter().find(|s| s.limit == *limit).map(|s| s.window)
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
