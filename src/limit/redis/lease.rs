//! Local-first mode: each instance reserves a few units of a limit in Redis at a time (a lease)
//! and admits from them in memory, with no I/O; it tops the lease up in the background before
//! it runs out.
//!
//! Units are taken from the shared counter *before* they are admitted, so the instances together
//! never admit more than the limit: no overshoot, whatever the timing. The price is the other
//! side: units an instance reserved and did not use before the window ended were counted and
//! never admitted, so while an instance holds unused units, another may be refused up to that
//! many early (at most [`reserve_for`] per instance per limit and window). Unkey's local-first
//! limits, which sync admitted counts after the fact, bound the error the other way (overshoot).

use super::batch::window_ms;
use super::scripts::{script, Script};
use super::{NoAnswer, Shared};
use crate::fnv::FnvState;
use crate::limit::{Denied, LimitState, RateLimit, Refusal};
use crate::lock::lock;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

const SHARDS: usize = 16;

/// The leases this instance holds, by key id.
pub(super) struct Leases {
    reserve: u64,
    shards: [Mutex<Shard>; SHARDS],
}

#[derive(Default)]
struct Shard {
    /// By key id: only verified keys reach the limiter, so their ids are trusted (see `fnv`).
    keys: HashMap<Box<str>, Vec<Lease>, FnvState>,
    added: usize,
    after_sweep: usize,
}

/// Units of one limit's current window reserved for this instance.
struct Lease {
    limit: RateLimit,
    /// Reserved and not yet admitted.
    left: u64,
    /// What no instance had reserved at the last grant (the limit less the shared count).
    unreserved: u64,
    /// When the window ends on this clock: measured from before the reservation was sent, so
    /// never after Redis's end.
    ends: Instant,
    /// When the window has surely ended on this clock: measured from when the grant came back.
    reopens: Instant,
    /// The window's end on Redis's clock: which window the units belong to.
    window: i64,
    /// A top-up is on its way.
    topping: bool,
}

/// What the leases say about a request.
pub(super) enum Take {
    /// Admitted from the leases: each limit's state, and what to reserve ahead in the background.
    Taken(Vec<LimitState>, Vec<(RateLimit, u64)>),
    /// These limits' leases do not cover it: what to reserve for each.
    Short(Vec<(RateLimit, u64)>),
}

/// What one reservation granted for one limit.
struct Grant {
    granted: u64,
    ttl: Duration,
    window: i64,
    count: u64,
}

/// How many units an instance reserves at a time: `reserve`, but at most a sixteenth of the limit
/// (at least 1), so that a small limit is not held by one instance.
pub(super) fn reserve_for(reserve: u64, limit: &RateLimit) -> u64 {
    reserve.min(limit.limit() / 16).max(1)
}

impl Leases {
    pub(super) fn new(reserve: u64) -> Self {
        Self { reserve: reserve.max(1), shards: std::array::from_fn(|_| Mutex::default()) }
    }

    fn shard(&self, key_id: &str) -> &Mutex<Shard> {
        // Bits 32.., which the map inside the shard does not read (as in the memory limiter).
        &self.shards[(FnvState::default().hash_one(key_id) >> 32) as usize % SHARDS]
    }

    /// Admits a request from the leases if they cover every limit (all or nothing), without I/O.
    pub(super) fn take(&self, key_id: &str, limits: &[(RateLimit, u64)]) -> Take {
        let now = Instant::now();
        let mut shard = lock(self.shard(key_id));
        let leases = shard.keys.get_mut(key_id).map_or(&mut [][..], |l| l.as_mut_slice());
        let covers = |(limit, cost): &(RateLimit, u64)| {
            leases.iter().any(|l| l.limit == *limit && l.ends > now && l.left >= *cost)
        };
        if !limits.iter().all(covers) {
            let short = limits.iter().filter(|l| !covers(l));
            return Take::Short(short.map(|(l, cost)| (l.clone(), reserve_for(self.reserve, l).max(*cost))).collect());
        }
        let mut states = Vec::with_capacity(limits.len());
        let mut ahead = Vec::new();
        for (limit, cost) in limits {
            let Some(lease) = leases.iter_mut().find(|l| l.limit == *limit) else { continue };
            lease.left -= cost;
            let remaining = lease.left + lease.unreserved;
            states.push(LimitState { limit: limit.clone(), remaining, reset: lease.ends - now });
            // Half spent: reserve the next units now, so requests do not wait for them.
            let want = reserve_for(self.reserve, limit);
            if lease.left < want.div_ceil(2) && !lease.topping && lease.unreserved > 0 {
                lease.topping = true;
                ahead.push((limit.clone(), want));
            }
        }
        Take::Taken(states, ahead)
    }

    /// Adds what Redis granted to the leases, replacing any of an ended window.
    fn add(&self, key_id: &str, (sent, received): (Instant, Instant), grants: &[(RateLimit, Grant)]) {
        let mut guard = lock(self.shard(key_id));
        let shard = &mut *guard;
        if !shard.keys.contains_key(key_id) {
            shard.keys.insert(key_id.into(), Vec::with_capacity(grants.len()));
            shard.added += 1;
            // Amortised, as in the memory limiter: ended leases go once as many keys were added.
            if shard.added >= shard.after_sweep.max(64) {
                let now = Instant::now();
                shard.keys.retain(|_, leases| leases.iter().any(|l| l.ends > now));
                shard.added = 0;
                shard.after_sweep = shard.keys.len();
            }
        }
        let Some(leases) = shard.keys.get_mut(key_id) else { return };
        for (limit, g) in grants {
            let (ends, reopens) = (sent + g.ttl, received + g.ttl);
            let unreserved = limit.limit().saturating_sub(g.count);
            match leases.iter_mut().find(|l| l.limit == *limit) {
                Some(l) if l.window == g.window => {
                    l.left += g.granted;
                    l.unreserved = unreserved;
                    l.topping = false;
                }
                found => {
                    let fresh = Lease {
                        limit: limit.clone(),
                        left: g.granted,
                        unreserved,
                        ends,
                        reopens,
                        window: g.window,
                        topping: false,
                    };
                    match found {
                        Some(l) => *l = fresh,
                        None => leases.push(fresh),
                    }
                }
            }
        }
    }

    /// A top-up that failed: let the next request try again.
    fn untop(&self, key_id: &str, limits: &[(RateLimit, u64)]) {
        if let Some(leases) = lock(self.shard(key_id)).keys.get_mut(key_id) {
            for l in leases.iter_mut().filter(|l| limits.iter().any(|(limit, _)| *limit == l.limit)) {
                l.topping = false;
            }
        }
    }

    /// The first limit whose window cannot hold the request even with every unit no instance has
    /// reserved: refused until its window ends.
    fn spent(&self, key_id: &str, limits: &[(RateLimit, u64)]) -> Option<Denied> {
        let now = Instant::now();
        let shard = lock(self.shard(key_id));
        let leases = shard.keys.get(key_id)?;
        limits.iter().find_map(|(limit, cost)| {
            let lease = leases.iter().find(|l| l.limit == *limit && l.ends > now)?;
            (lease.left.saturating_add(lease.unreserved) < *cost)
                .then(|| Denied { limit: limit.clone(), retry_after: lease.reopens - now })
        })
    }
}

impl Shared {
    /// Reserves units of `wanted` limits for `key_id` and adds them to its leases.
    pub(super) async fn reserve(
        &self,
        leases: &Leases,
        key_id: &str,
        wanted: &[(RateLimit, u64)],
    ) -> redis::RedisResult<()> {
        let mut invocation = script(Script::Reserve).prepare_invoke();
        for (limit, want) in wanted {
            invocation.key(self.counter(super::Owner { key_id, identity: None }, limit));
            invocation.arg(limit.limit()).arg(window_ms(limit)).arg(*want);
        }
        let sent = Instant::now();
        let replies: Vec<[i64; 4]> = self.conn.write(&invocation).await?;
        if replies.len() != wanted.len() {
            return Err((redis::ErrorKind::UnexpectedReturnType, "unexpected reservation reply").into());
        }
        let grants: Vec<(RateLimit, Grant)> = wanted
            .iter()
            .zip(replies)
            .map(|((limit, _), [granted, ttl, window, count])| {
                let grant = Grant {
                    granted: granted.max(0) as u64,
                    ttl: Duration::from_millis(ttl.max(0) as u64),
                    window,
                    count: count.max(0) as u64,
                };
                (limit.clone(), grant)
            })
            .collect();
        leases.add(key_id, (sent, Instant::now()), &grants);
        Ok(())
    }

    /// Reserves ahead in the background; a failure leaves the lease to be topped up on demand.
    pub(super) fn reserve_ahead(self: &Arc<Self>, key_id: &str, ahead: Vec<(RateLimit, u64)>) {
        let (shared, key_id) = (self.clone(), Box::<str>::from(key_id));
        tokio::spawn(async move {
            let Some(leases) = shared.leases.as_ref() else { return };
            let reserved = tokio::time::timeout(shared.timeout, shared.reserve(leases, &key_id, &ahead)).await;
            if !matches!(reserved, Ok(Ok(()))) {
                leases.untop(&key_id, &ahead);
            }
        });
    }

    /// Local-first: admits from the leases, reserving what is short first. `None` when it
    /// cannot say (the leases kept being taken by other requests: Redis decides); `Err` when Redis
    /// did not answer a reservation (the fallback decides).
    pub(super) async fn decide_from_leases(
        self: &Arc<Self>,
        leases: &Leases,
        key_id: &str,
        limits: &[(RateLimit, u64)],
    ) -> Result<Option<Result<Vec<LimitState>, Refusal>>, NoAnswer> {
        // As the algorithm says: a cost above the whole limit never passes, and waits a window.
        if let Some((limit, _)) = limits.iter().find(|(l, cost)| *cost > l.limit()) {
            return Ok(Some(Err(Refusal::Rate(Denied { limit: limit.clone(), retry_after: limit.window() }))));
        }
        // Another request may take what a reservation brought before this one does: a few tries.
        for _ in 0..4 {
            let short = match leases.take(key_id, limits) {
                Take::Taken(states, ahead) => {
                    if !ahead.is_empty() {
                        self.reserve_ahead(key_id, ahead);
                    }
                    return Ok(Some(Ok(states)));
                }
                Take::Short(short) => short,
            };
            match tokio::time::timeout(self.timeout, self.reserve(leases, key_id, &short)).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => return Err(NoAnswer::failed(&error)),
                Err(_) => return Err(NoAnswer::Timeout(self.timeout)),
            }
            if let Some(denied) = leases.spent(key_id, limits) {
                return Ok(Some(Err(Refusal::Rate(denied))));
            }
        }
        Ok(None)
    }
}
