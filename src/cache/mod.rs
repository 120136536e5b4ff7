//! The verification cache: what a key *is*, by key fingerprint, so a known key costs a map lookup
//! and no SHA-256.
//!
//! - **Facts, not decisions.** The cached answer is the key's status and facts; the route's scope
//!   is decided per request from them, so one upstream call serves every route.
//! - **TTLs.** A `VALID` answer lives `positive_ttl` (default 30 s) and never past the key's expiry;
//!   `INVALID`, `DELETED`, `DISABLED`, `EXPIRED` and `USAGE_LIMITED` live `negative_ttl` (default 5 s);
//!   `RATE_LIMITED` never past its reset; errors and `INVALID_SCOPES` are not cached.
//! - **Single-flight.** Concurrent misses on one key make one upstream call.
//! - **Stale-if-error** (RFC 5861). When the upstream fails, a `VALID` answer up to `max_stale` past
//!   its TTL is served (marked stale), never past the key's expiry.
//! - **Newest answer wins.** An answer is stored only if its upstream call started after the one
//!   that produced the entry in place, and after the key's last invalidation; so a slow, older
//!   `VALID` never overwrites a newer refusal or a revocation.
//!
//! - **Revocations win.** A revocation and an answer on its way into the cache are serialized (the
//!   index's lock), so an answer from a call started before a revocation is never left cached.
//!
//! Memory: an entry holds moka's per-entry bookkeeping, an 8-byte digest prefix for the digest
//! index, and an `Arc` of the key's facts (about 230 B plus its strings); see the README's
//! benchmark table for measured figures.

mod flight;
mod index;

use crate::boxed::BoxFuture;
use crate::key::{Fingerprint, KeyDigest, PresentedKey};
use crate::observe::{CacheLookups, Lookup};
use crate::verify::{KeyStatus, Verification, Verifier, VerifyError, VerifyRequest};
use flight::Flights;
use index::DigestIndex;
use moka::ops::compute::Op;
use moka::sync::Cache;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

#[doc = include_str!("../../docs/cache_config.md")]
#[derive(Debug, Clone)]
pub struct CacheConfig {
    max_entries: u64,
    positive_ttl: Duration,
    negative_ttl: Duration,
    max_stale: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_entries: 100_000,
            positive_ttl: Duration::from_secs(30),
            negative_ttl: Duration::from_secs(5),
            max_stale: Duration::from_secs(60),
        }
    }
}

/// The longest any cache duration is taken to be (moka refuses more than 1 000 years, and an
/// `Instant` can overflow): a year.
const LONGEST: Duration = Duration::from_secs(365 * 24 * 3600);

impl CacheConfig {
    /// The most keys kept (default 100 000); beyond it moka evicts the least useful.
    #[must_use]
    pub fn max_entries(mut self, n: u64) -> Self {
        self.max_entries = n;
        self
    }

    /// How long a `VALID` answer is fresh (default 30 s): the longest a revoked key keeps working
    /// when nobody calls [`CachedVerifier::invalidate`].
    #[must_use]
    pub fn positive_ttl(mut self, ttl: Duration) -> Self {
        self.positive_ttl = ttl.min(LONGEST);
        self
    }

    /// How long a refusal is remembered (default 5 s).
    #[must_use]
    pub fn negative_ttl(mut self, ttl: Duration) -> Self {
        self.negative_ttl = ttl.min(LONGEST);
        self
    }

    /// How long past its TTL a `VALID` answer may be served while the upstream fails (default
    /// 60 s; zero turns stale-if-error off).
    #[must_use]
    pub fn max_stale(mut self, max_stale: Duration) -> Self {
        self.max_stale = max_stale.min(LONGEST);
        self
    }
}

/// Held by value in moka, not behind an `Arc` of its own: one allocation and its header fewer per
/// key (53 bytes at a million keys). A hit copies it, ~70 instructions more than an `Arc` clone.
#[derive(Clone)]
struct Entry {
    answer: Answer,
    /// The key's digest's prefix, to take it out of the digest index when the entry goes.
    prefix: u64,
    /// When the upstream call that produced this entry started, and until when the entry is fresh
    /// and may be kept; in nanoseconds since the cache was made (8 bytes, not an `Instant`'s 16).
    started: u64,
    fresh_until: u64,
    keep_until: u64,
}

/// A [`Verification`] as the cache keeps it: the rare rate-limit state boxed.
#[derive(Clone)]
struct Answer {
    status: KeyStatus,
    facts: Option<Arc<crate::facts::KeyFacts>>,
    rate_limit: Option<Box<crate::verify::ReportedLimit>>,
}

impl Answer {
    fn of(v: &Verification) -> Self {
        Self { status: v.status, facts: v.facts.clone(), rate_limit: v.rate_limit.map(Box::new) }
    }

    fn into_verification(self, stale: bool) -> Verification {
        let mut v = Verification::invalid();
        (v.status, v.facts, v.rate_limit, v.stale) = (self.status, self.facts, self.rate_limit.map(|r| *r), stale);
        v
    }
}

#[doc = include_str!("../../docs/cached_verifier.md")]
pub struct CachedVerifier<V> {
    shared: Arc<Shared<V>>,
}

impl<V> Clone for CachedVerifier<V> {
    fn clone(&self) -> Self {
        Self { shared: self.shared.clone() }
    }
}

struct Shared<V> {
    verifier: V,
    /// What entries' times count from.
    base: Instant,
    cache: Cache<Fingerprint, Entry>,
    /// Which entries may hold a digest, for revocations that arrive as digests. Its lock is held
    /// across every change that must not interleave with another: an answer stored (checked
    /// against revocations, indexed, put), a revocation (recorded, entries dropped). Taken on
    /// misses and revocations only, never on a hit.
    index: Mutex<DigestIndex>,
    /// Entries that left the cache, as `(prefix, fingerprint)`, for the index to forget on its
    /// next use: moka's eviction listener runs inside cache operations made under the index's
    /// lock, so it may not take that lock itself.
    evicted: Arc<Mutex<Vec<(u64, Fingerprint)>>>,
    /// When recently invalidated keys were invalidated: answers from calls started before that are
    /// not stored.
    invalidated: Cache<KeyDigest, Instant>,
    flights: Flights<Result<Verification, VerifyError>>,
    /// Bumped by `invalidate_all`: answers from calls started before it are not stored.
    generation: AtomicU64,
    config: CacheConfig,
    /// Stale answers served while the verifier fails, logged as a state change, not per request.
    stale_serving: crate::outage::Outage,
    /// Lookups counted (feature `metrics`).
    lookups: CacheLookups,
}

impl<V: Verifier> CachedVerifier<V> {
    /// Caches `verifier`'s answers.
    pub fn new(verifier: V, config: CacheConfig) -> Self {
        // One TTL for the whole cache (an entry's own freshness and stale window are checked on
        // read): moka then keeps no per-entry timer, which is most of its per-entry memory.
        let evicted: Arc<Mutex<Vec<(u64, Fingerprint)>>> = Arc::default();
        let listener = evicted.clone();
        let cache = Cache::builder()
            .max_capacity(config.max_entries)
            .time_to_live((config.positive_ttl + config.max_stale).max(config.negative_ttl))
            .eviction_listener(move |fingerprint: Arc<Fingerprint>, entry: Entry, cause| {
                // A replaced entry's successor has the same key and digest: keep its index entry.
                if cause != moka::notification::RemovalCause::Replaced {
                    crate::lock::lock(&listener).push((entry.prefix, *fingerprint));
                }
            })
            .build();
        // Kept longer than any call can take, so an answer from before an invalidation is recognised.
        let remember = config.positive_ttl.max(Duration::from_secs(60));
        let invalidated = Cache::builder().max_capacity(100_000).time_to_live(remember).build();
        let flights = Flights::new();
        let generation = AtomicU64::new(0);
        let stale_serving = crate::outage::Outage::new("the verifier", "serving stale answers where it can");
        let shared = Shared {
            verifier,
            base: Instant::now(),
            cache,
            index: Mutex::default(),
            evicted,
            invalidated,
            flights,
            generation,
            config,
            stale_serving,
            lookups: Default::default(),
        };
        Self { shared: Arc::new(shared) }
    }

    /// Forgets what is cached for `key`: its next request asks the verifier, and an answer from a
    /// call already in flight is not stored.
    pub fn invalidate(&self, key: &str) {
        let fingerprint = Fingerprint::of(key);
        let _serialized = self.shared.index();
        self.shared.invalidated.insert(KeyDigest::of(key), Instant::now());
        self.shared.cache.invalidate(&fingerprint);
        // Requests from now on must not join a call that started before the revocation.
        self.shared.flights.forget(&fingerprint);
    }

    /// [`invalidate`](Self::invalidate) by digest, for revocations that arrive as digests (from
    /// another instance, say): one index lookup and one removal, whatever the cache holds. A call
    /// already in flight for the key may still answer the requests that joined it, but its answer
    /// is not stored.
    pub fn invalidate_digest(&self, digest: &KeyDigest) {
        let index = self.shared.index();
        self.shared.invalidated.insert(*digest, Instant::now());
        for fingerprint in index.holders(digest.prefix()) {
            self.shared.cache.invalidate(&fingerprint);
            self.shared.flights.forget(&fingerprint);
        }
    }

    /// Applies a revocation from a store's feed (`RedisKeyStore::listen`,
    /// `PostgresKeyStore::listen`): [`invalidate_digest`](Self::invalidate_digest) for one key,
    /// [`invalidate_all`](Self::invalidate_all) when some may have been missed.
    #[cfg(any(feature = "redis", feature = "postgres"))]
    #[cfg_attr(docsrs, doc(cfg(any(feature = "redis", feature = "postgres"))))]
    pub fn revoke(&self, revoked: crate::store::Revoked<'_>) {
        match revoked {
            crate::store::Revoked::Key(digest) => self.invalidate_digest(digest),
            crate::store::Revoked::All => self.invalidate_all(),
        }
    }

    /// Forgets everything.
    pub fn invalidate_all(&self) {
        let _serialized = self.shared.index();
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
        self.shared.cache.invalidate_all();
    }

    /// How many entries the cache holds. Approximate until [`run_pending_tasks`](Self::run_pending_tasks).
    #[must_use]
    pub fn entry_count(&self) -> u64 {
        self.shared.cache.entry_count()
    }

    /// Runs moka's pending maintenance (evictions, expirations) now.
    pub fn run_pending_tasks(&self) {
        self.shared.cache.run_pending_tasks();
        drop(self.shared.index());
    }

    /// How many keys have an upstream call in flight.
    #[must_use]
    pub fn in_flight(&self) -> usize {
        self.shared.flights.len()
    }

    /// The wrapped verifier.
    #[must_use]
    pub fn inner(&self) -> &V {
        &self.shared.verifier
    }
}

impl<V: Verifier> Shared<V> {
    /// The digest index, locked, having forgotten the entries that left the cache since its last
    /// use (those whose fingerprint holds no entry now: a successor stored since keeps its place).
    fn index(&self) -> MutexGuard<'_, DigestIndex> {
        let mut index = crate::lock::lock(&self.index);
        let evicted = std::mem::take(&mut *crate::lock::lock(&self.evicted));
        for (prefix, fingerprint) in evicted {
            if !self.cache.contains_key(&fingerprint) {
                index.remove(prefix, &fingerprint);
            }
        }
        index
    }

    fn at(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.base).as_nanos().min(u64::MAX as u128) as u64
    }

    fn fresh(&self, fingerprint: &Fingerprint) -> Option<Verification> {
        let entry = self.cache.get(fingerprint)?;
        (self.at(Instant::now()) < entry.fresh_until).then(|| entry.answer.into_verification(false))
    }

    /// A `VALID` answer past its TTL but inside `max_stale` and the key's expiry.
    fn stale(&self, fingerprint: &Fingerprint) -> Option<Verification> {
        let entry = self.cache.get(fingerprint)?;
        let answer = Some(entry.answer).filter(|a| a.status == KeyStatus::Valid)?;
        let expired = answer.facts.as_ref().is_some_and(|f| f.is_expired_at(SystemTime::now()));
        (!expired && self.at(Instant::now()) < entry.keep_until).then(|| answer.into_verification(true))
    }

    /// `(fresh_until, keep_until)` for an answer, or `None` if it must not be cached.
    fn lifetimes(&self, answer: &Verification, now: Instant) -> Option<(Instant, Instant)> {
        let c = &self.config;
        let wall = SystemTime::now();
        let until = |at: SystemTime| at.duration_since(wall).ok();
        match answer.status {
            KeyStatus::Valid => {
                let left = answer.facts.as_ref()?.ends_at().map_or(Some(Duration::MAX), until)?;
                let fresh = now + c.positive_ttl.min(left);
                Some((fresh, now + (c.positive_ttl + c.max_stale).min(left)))
            }
            KeyStatus::RateLimited => {
                let ttl = c.negative_ttl.min(until(answer.rate_limit?.reset_at)?);
                Some((now + ttl, now + ttl))
            }
            KeyStatus::InvalidScopes => None,
            _ => Some((now + c.negative_ttl, now + c.negative_ttl)),
        }
    }

    fn store(&self, key: (Fingerprint, KeyDigest), answer: &Verification, started: Instant, generation: u64) {
        let (fingerprint, digest) = key;
        let lifetimes = self.lifetimes(answer, Instant::now());
        // Held until the answer is in the cache: a revocation comes wholly before (and is seen
        // here) or wholly after (and finds the entry through the index).
        let mut index = self.index();
        let revoked_since = self.invalidated.get(&digest).is_some_and(|at| at >= started);
        if revoked_since || self.generation.load(Ordering::SeqCst) != generation {
            return;
        }
        if lifetimes.is_some() {
            index.insert(digest.prefix(), fingerprint);
        }
        self.cache.entry(fingerprint).and_compute_with(|current| match (current, lifetimes) {
            (Some(e), _) if e.value().started > self.at(started) => Op::Nop,
            (_, None) => Op::Remove,
            (_, Some((fresh_until, keep_until))) => Op::Put(Entry {
                answer: Answer::of(answer),
                prefix: digest.prefix(),
                started: self.at(started),
                fresh_until: self.at(fresh_until),
                keep_until: self.at(keep_until),
            }),
        });
    }

    async fn load(self: Arc<Self>, request: VerifyRequest) -> Result<Verification, VerifyError> {
        let key = (Fingerprint::of(request.key.expose_secret()), request.digest);
        let shared = self.clone();
        let result = self
            .flights
            .run(key.0, move || async move {
                // Filled while this request waited its turn?
                if let Some(answer) = shared.fresh(&key.0) {
                    return Ok(answer);
                }
                let (started, generation) = (Instant::now(), shared.generation.load(Ordering::SeqCst));
                let result = shared.verifier.verify(request).await;
                if let Ok(answer) = &result {
                    shared.store(key, answer, started, generation);
                    shared.stale_serving.recovered();
                }
                result
            })
            .await;
        result.or_else(|error| match self.stale(&key.0) {
            Some(stale) => {
                crate::observe::stale_served();
                self.stale_serving.failed(&error);
                Ok(stale)
            }
            None => Err(error),
        })
    }
}

impl<V: Verifier> Verifier for CachedVerifier<V> {
    fn verify_now(&self, key: &PresentedKey<'_>) -> Option<Verification> {
        let answer = self.shared.fresh(&key.fingerprint());
        self.shared.lookups.count(match &answer {
            Some(a) if a.status == KeyStatus::Valid => Lookup::Hit,
            Some(_) => Lookup::NegativeHit,
            None => Lookup::Miss,
        });
        answer
    }

    fn verify(&self, request: VerifyRequest) -> BoxFuture<'static, Result<Verification, VerifyError>> {
        Box::pin(self.shared.clone().load(request))
    }
}

impl<V> std::fmt::Debug for CachedVerifier<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedVerifier")
            .field("config", &self.shared.config)
            .field("entries", &self.shared.cache.entry_count())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct AllValid;

    impl Verifier for AllValid {
        fn verify(&self, _: VerifyRequest) -> BoxFuture<'static, Result<Verification, VerifyError>> {
            let facts = Arc::new(crate::facts::KeyFacts::new("k"));
            Box::pin(async move { Ok(Verification::new(KeyStatus::Valid, facts)) })
        }
    }

    /// Entries evicted for room, invalidated or dropped all at once leave the index on its next
    /// use: it never holds more than the cache does.
    #[tokio::test]
    async fn the_index_forgets_entries_that_leave_the_cache() {
        let cache = CachedVerifier::new(AllValid, CacheConfig::default().max_entries(100));
        let request = |i: usize| VerifyRequest::new(crate::key::ApiKey::new(format!("key-{i}")));
        for i in 0..1_000 {
            cache.verify(request(i)).await.unwrap();
        }
        cache.run_pending_tasks();
        let indexed = cache.shared.index().len() as u64;
        assert!(indexed <= 110 && indexed == cache.entry_count(), "{indexed} indexed, {} cached", cache.entry_count());
        cache.invalidate("key-999");
        cache.invalidate_digest(&KeyDigest::of("key-998"));
        cache.run_pending_tasks();
        assert_eq!(cache.shared.index().len() as u64, cache.entry_count());
        cache.invalidate_all();
        cache.run_pending_tasks();
        assert_eq!((cache.shared.index().len(), cache.entry_count()), (0, 0));
    }
}
