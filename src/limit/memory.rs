//! The in-memory limiter: fixed windows anchored at each key's first request.

#[cfg(feature = "redis")]
use super::ledger::Whose;
use super::ledger::{Charges, Ledger};
use super::window::{self, Check, Window};
use super::{Denied, LimitRequest, LimitState, LimitVerdict, Limiter, RateLimit, Refusal, WallClock};
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
    /// The time refills are decided by.
    clock: WallClock,
}

/// A key's counters and its identity's live in the shard of the identity (of the key, if it has
/// none), so one lock decides them together.
#[derive(Default)]
struct Shard {
    /// By key id: only verified keys reach the limiter, so their ids are trusted (see `fnv`).
    keys: HashMap<Box<str>, Vec<Slot>, FnvState>,
    /// By identity: one slot per limit name and window, shared by all of its keys.
    identities: HashMap<Box<str>, Vec<Slot>, FnvState>,
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
        self.identities.retain(|_, slots| slots.iter().any(|s| s.window.end > now));
        self.added = 0;
        self.after_sweep = self.keys.len() + self.identities.len();
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
        Self {
            origin: Instant::now(),
            shards: std::array::from_fn(|_| Mutex::default()),
            ledger: Ledger::default(),
            clock: WallClock::system(),
        }
    }

    /// Decides refill periods by `clock` (default: the system's). Rate-limit windows run on
    /// tokio's clock, which a test pauses and advances.
    #[must_use]
    pub fn clock(mut self, clock: WallClock) -> Self {
        self.clock = clock;
        self
    }

    /// How many key ids and identities have state. Idle keys are swept as new keys arrive; [`sweep`](Self::sweep)
    /// does it now.
    pub fn key_count(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                let shard = lock(s);
                shard.keys.len() + shard.identities.len()
            })
            .sum()
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
        let shared = request.identity.map(|i| super::distinct_counters(i.limits)).unwrap_or_default();
        let mut states = self.decide_distinct(key_id, &limits, &shared, request)?;
        if limits.len() != request.limits.len() {
            let theirs = states.split_off(limits.len());
            states = super::per_entry(request.limits, &limits, states);
            states.extend(theirs);
        }
        Ok(states)
    }

    fn decide_distinct(
        &self,
        key_id: &str,
        limits: &[(RateLimit, u64)],
        shared: &[(RateLimit, u64)],
        request: &LimitRequest<'_>,
    ) -> LimitVerdict {
        if limits.is_empty() && shared.is_empty() {
            return self.take_usage(key_id, request).map(|()| Vec::new());
        }
        let now = self.now();
        let identity = request.identity.map(|i| i.id);
        let mut guard = lock(self.shard(identity.unwrap_or(key_id)));
        let Shard { keys, identities, added, after_sweep } = &mut *guard;
        // One lookup each for a known key and identity, kept for both phases; only a new one
        // allocates its id.
        let mine = keys.get_mut(key_id);
        let theirs = identity.and_then(|id| identities.get_mut(id));
        // First decide every limit, then consume: all or nothing.
        let mut states = Vec::with_capacity(limits.len() + shared.len());
        {
            let (m, t) =
                (mine.as_deref().map_or(&[][..], Vec::as_slice), theirs.as_deref().map_or(&[][..], Vec::as_slice));
            let asked = limits.iter().map(|l| (l, m, false)).chain(shared.iter().map(|l| (l, t, true)));
            for ((limit, cost), slots, by_counter) in asked {
                let open = window::current(last_window(slots, limit, by_counter), now);
                match window::check(open, limit.limit(), limit.window().as_nanos(), *cost, now) {
                    Check::Fits { remaining, reset } => {
                        states.push(LimitState { limit: limit.clone(), remaining, reset: nanos(reset) });
                    }
                    Check::Exceeds { retry_after } => {
                        return Err(Refusal::Rate(Denied { limit: limit.clone(), retry_after: nanos(retry_after) }));
                    }
                }
            }
        }
        // Usage last: under the shard lock, so a refusal here leaves every window as it was.
        self.take_usage(key_id, request)?;
        let mut new = 0;
        match mine {
            Some(slots) => consume(slots, limits, now, false),
            None if !limits.is_empty() => {
                let mut slots = Vec::with_capacity(limits.len());
                consume(&mut slots, limits, now, false);
                keys.insert(key_id.into(), slots);
                new += 1;
            }
            None => {}
        }
        match (theirs, identity) {
            (Some(slots), _) => consume(slots, shared, now, true),
            (None, Some(id)) if !shared.is_empty() => {
                let mut slots = Vec::with_capacity(shared.len());
                consume(&mut slots, shared, now, true);
                identities.insert(id.into(), slots);
                new += 1;
            }
            _ => {}
        }
        *added += new;
        // Amortised: a sweep costs the shard's size, and runs once that many keys were added.
        if new > 0 && *added >= (*after_sweep).max(64) {
            guard.sweep(now);
        }
        Ok(states)
    }
}

impl MemoryLimiter {
    /// Sets a key's windows (and its identity's) to what another counter (Redis) last said: for
    /// each limit, what is used and the time left in its window. The Redis limiter's fallback
    /// starts from this.
    #[cfg(feature = "redis")]
    pub(crate) fn mirror(
        &self,
        key_id: &str,
        identity: Option<&str>,
        windows: &[(RateLimit, u64, Duration)],
        shared: &[(RateLimit, u64, Duration)],
    ) {
        let now = self.now();
        let mut guard = lock(self.shard(identity.unwrap_or(key_id)));
        let shard = &mut *guard;
        let set = |map: &mut HashMap<Box<str>, Vec<Slot>, FnvState>,
                   id: &str,
                   windows: &[(RateLimit, u64, Duration)],
                   by_counter: bool| {
            if windows.is_empty() {
                return;
            }
            if !map.contains_key(id) {
                map.insert(id.into(), Vec::with_capacity(windows.len()));
            }
            let Some(entry) = map.get_mut(id) else { return };
            for (limit, used, reset) in windows {
                let window = Window { used: *used, end: now + reset.as_nanos() };
                match entry.iter_mut().find(|s| matches(&s.limit, limit, by_counter)) {
                    Some(s) => *s = Slot { limit: limit.clone(), window },
                    None => entry.push(Slot { limit: limit.clone(), window }),
                }
            }
        };
        set(&mut shard.keys, key_id, windows, false);
        if let Some(identity) = identity {
            set(&mut shard.identities, identity, shared, true);
        }
    }

    /// Forgets the usage counted for a key or an identity (it was handed to another counter).
    #[cfg(feature = "redis")]
    pub(crate) fn forget_usage(&self, whose: Whose, id: &str) {
        self.ledger.forget(whose, id);
    }

    fn take_usage(&self, key_id: &str, request: &LimitRequest<'_>) -> Result<(), Refusal> {
        let charges = usage_charges(key_id, request);
        if charges.iter().all(Option::is_none) || self.ledger.reserve(charges, || self.clock.now()) {
            Ok(())
        } else {
            Err(Refusal::Usage)
        }
    }
}

/// The usage a request takes: from its key's allowance and its identity's.
fn usage_charges<'r>(key_id: &'r str, request: &'r LimitRequest<'_>) -> Charges<'r> {
    let theirs = request.identity.as_ref().and_then(|i| Some((i.id, i.usage.as_ref()?)));
    [request.usage.as_ref().map(|u| (key_id, u)), theirs]
}

/// Takes each limit's cost from its window, opening a new window where the last one ended.
fn consume(slots: &mut Vec<Slot>, limits: &[(RateLimit, u64)], now: u128, by_counter: bool) {
    for (limit, cost) in limits {
        let length = limit.window().as_nanos();
        match slots.iter_mut().find(|s| matches(&s.limit, limit, by_counter)) {
            Some(s) => s.window = window::take(window::current(Some(s.window), now), length, *cost, now),
            None => slots.push(Slot { limit: limit.clone(), window: window::take(None, length, *cost, now) }),
        }
    }
}

/// Whether a slot counts for `limit`: the same limit for a key, the same counter for an identity.
fn matches(slot: &RateLimit, limit: &RateLimit, by_counter: bool) -> bool {
    if by_counter {
        super::same_counter(slot, limit)
    } else {
        slot == limit
    }
}

fn last_window(slots: &[Slot], limit: &RateLimit, by_counter: bool) -> Option<Window> {
    slots.iter().find(|s| matches(&s.limit, limit, by_counter)).map(|s| s.window)
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

    fn charge(&self, key_id: &str, request: &LimitRequest<'_>) {
        self.ledger.charge(usage_charges(key_id, request), || self.clock.now());
    }
}

impl std::fmt::Debug for MemoryLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryLimiter").field("keys", &self.key_count()).finish()
    }
}
