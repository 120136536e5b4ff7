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
//! Memory: an entry holds the digest (32 B), moka's per-entry bookkeeping, and an `Arc` of the
//! key's facts (about 200 B plus its strings); see the README's benchmark table for measured figures.

mod flight;

use crate::boxed::BoxFuture;
use crate::key::{Fingerprint, KeyDigest, PresentedKey};
use crate::observe::{CacheLookups, Lookup};
use crate::verify::{KeyStatus, Verification, Verifier, VerifyError, VerifyRequest};
use flight::Flights;
use moka::ops::compute::Op;
use moka::sync::Cache;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
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
    /// The key's digest, to take it out of the digest index when the entry goes.
    digest: KeyDigest,
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
    /// Which entry holds a digest, for revocations that arrive as digests: entries are added
    /// before they enter the cache and removed when they leave it (moka's eviction listener), so
    /// every cached key is found here. Touched on misses and revocations only, never on a hit.
    by_digest: Arc<std::sync::Mutex<std::collections::HashMap<KeyDigest, Fingerprint>>>,
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
        let by_digest: Arc<std::sync::Mutex<std::collections::HashMap<KeyDigest, Fingerprint>>> = Arc::default();
        let index = by_digest.clone();
        let cache = Cache::builder()
            .max_capacity(config.max_entries)
            .time_to_live((config.positive_ttl + config.max_stale).max(config.negative_ttl))
            .eviction_listener(move |fingerprint: Arc<Fingerprint>, entry: Entry, cause| {
                // A replaced entry's successor has the same key and digest: keep its index entry.
                if cause != moka::notification::RemovalCause::Replaced {
                    let mut index = crate::lock::lock(&index);
                    if index.get(&entry.digest) == Some(&*fingerprint) {
                        index.remove(&entry.digest);
                    }
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
            by_digest,
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
        self.shared.invalidated.insert(*digest, Instant::now());
        let fingerprint = crate::lock::lock(&self.shared.by_digest).get(digest).copied();
        if let Some(fingerprint) = fingerprint {
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
        let revoked_since = self.invalidated.get(&digest).is_some_and(|at| at >= started);
        if revoked_since || self.generation.load(Ordering::SeqCst) != generation {
            return;
        }
        let lifetimes = self.lifetimes(answer, Instant::now());
        if lifetimes.is_some() {
            crate::lock::lock(&self.by_digest).insert(digest, fingerprint);
        }
        self.cache.entry(fingerprint).and_compute_with(|current| match (current, lifetimes) {
            (Some(e), _) if e.value().started > self.at(started) => Op::Nop,
            (_, None) => Op::Remove,
            (_, Some((fresh_until, keep_until))) => Op::Put(Entry {
                answer: Answer::of(answer),
                digest,
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
