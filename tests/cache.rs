//! The verification cache on its own, with a scripted verifier: bounds, ordering of answers,
//! invalidation.

use keygate::cache::{CacheConfig, CachedVerifier};
use keygate::verify::{BoxFuture, Verification, Verifier, VerifyError, VerifyRequest};
use keygate::{ApiKey, KeyFacts, KeyStatus, PresentedKey};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Answers calls in order from a script of (delay, status); counts calls.
#[derive(Default, Clone)]
struct Scripted {
    script: Arc<Mutex<VecDeque<(Duration, KeyStatus)>>>,
    calls: Arc<AtomicUsize>,
}

impl Verifier for Scripted {
    fn verify(&self, _: VerifyRequest) -> BoxFuture<'static, Result<Verification, VerifyError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let (delay, status) = self.script.lock().unwrap().pop_front().unwrap_or((Duration::ZERO, KeyStatus::Invalid));
        Box::pin(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Ok(Verification::new(status, Arc::new(KeyFacts::new("k"))))
        })
    }
}

fn request(key: &str) -> VerifyRequest {
    VerifyRequest::new(ApiKey::new(key))
}

#[tokio::test]
async fn an_older_valid_never_overwrites_a_newer_refusal() {
    let scripted = Scripted::default();
    scripted.script.lock().unwrap().extend([
        (Duration::from_millis(300), KeyStatus::Valid), // slow, started before the revocation
        (Duration::from_millis(10), KeyStatus::Disabled), // fast, started after it
    ]);
    let cache = CachedVerifier::new(scripted.clone(), CacheConfig::default());
    let presented = PresentedKey::new("k");

    let slow = tokio::spawn({
        let cache = cache.clone();
        async move { cache.verify(request("k")).await.unwrap().status }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    cache.invalidate("k");
    // A request after the revocation does not join the older call: it makes its own.
    assert_eq!(cache.verify(request("k")).await.unwrap().status, KeyStatus::Disabled);
    assert_eq!(slow.await.unwrap(), KeyStatus::Valid, "the older caller gets its own answer");
    assert_eq!(scripted.calls.load(Ordering::SeqCst), 2);
    assert_eq!(cache.verify_now(&presented).map(|v| v.status), Some(KeyStatus::Disabled));
}

#[tokio::test]
async fn invalidate_all_discards_answers_in_flight() {
    let scripted = Scripted::default();
    scripted.script.lock().unwrap().push_back((Duration::from_millis(100), KeyStatus::Valid));
    let cache = CachedVerifier::new(scripted.clone(), CacheConfig::default());
    let call = tokio::spawn({
        let cache = cache.clone();
        async move { cache.verify(request("k")).await.unwrap().status }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    cache.invalidate_all();
    assert_eq!(call.await.unwrap(), KeyStatus::Valid);
    assert_eq!(cache.verify_now(&PresentedKey::new("k")), None, "not stored");
}

#[tokio::test]
async fn negative_answers_live_the_negative_ttl() {
    let scripted = Scripted::default();
    let config = CacheConfig::default().negative_ttl(Duration::from_millis(100));
    let cache = CachedVerifier::new(scripted.clone(), config);
    let presented = PresentedKey::new("nope");
    assert_eq!(cache.verify(request("nope")).await.unwrap().status, KeyStatus::Invalid);
    assert_eq!(cache.verify_now(&presented).map(|v| v.status), Some(KeyStatus::Invalid));
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(cache.verify_now(&presented), None);
}

#[tokio::test]
async fn the_cache_stays_within_its_bound() {
    let scripted = Scripted::default();
    let cache = CachedVerifier::new(scripted.clone(), CacheConfig::default().max_entries(1000));
    for i in 0..100_000u32 {
        assert_eq!(cache.verify(request(&format!("key-{i}"))).await.unwrap().status, KeyStatus::Invalid);
    }
    cache.run_pending_tasks();
    assert!(cache.entry_count() <= 1000, "{} entries", cache.entry_count());
    assert_eq!(scripted.calls.load(Ordering::SeqCst), 100_000);
    assert_eq!(cache.in_flight(), 0, "no flight is left behind");
}

#[tokio::test]
async fn absurd_durations_are_clamped_not_a_panic() {
    let scripted = Scripted::default();
    scripted.script.lock().unwrap().push_back((Duration::ZERO, KeyStatus::Valid));
    let config =
        CacheConfig::default().positive_ttl(Duration::MAX).negative_ttl(Duration::MAX).max_stale(Duration::MAX);
    let cache = CachedVerifier::new(scripted, config);
    assert_eq!(cache.verify(request("k")).await.unwrap().status, KeyStatus::Valid);
    assert!(cache.verify_now(&PresentedKey::new("k")).is_some());
}

/// Answers every key `VALID` at once, after noting which call (by count) has started.
#[derive(Default, Clone)]
struct Announcing {
    started: Arc<AtomicUsize>,
}

impl Verifier for Announcing {
    fn verify(&self, _: VerifyRequest) -> BoxFuture<'static, Result<Verification, VerifyError>> {
        self.started.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Ok(Verification::new(KeyStatus::Valid, Arc::new(KeyFacts::new("k")))) })
    }
}

/// A revocation made while an answer is on its way into the cache (the call started before it)
/// must never leave that answer cached, whichever way the two interleave: by raw key, by digest,
/// or all keys at once. Two threads race it over many keys, one revocation per call.
#[test]
fn a_revocation_racing_an_answer_into_the_cache_always_wins() {
    const ROUNDS: usize = 20_000;
    let verifier = Announcing::default();
    let cache = CachedVerifier::new(verifier.clone(), CacheConfig::default());
    let key = |i: usize| format!("race-{i}");
    let revoked = Arc::new(AtomicUsize::new(0));
    let revoker = std::thread::spawn({
        let (cache, started, revoked) = (cache.clone(), verifier.started.clone(), revoked.clone());
        move || {
            for i in 0..ROUNDS {
                while started.load(Ordering::SeqCst) <= i {
                    std::hint::spin_loop();
                }
                match i % 3 {
                    0 => cache.invalidate(&key(i)),
                    1 => cache.invalidate_digest(&keygate::KeyDigest::of(&key(i))),
                    _ => cache.invalidate_all(),
                }
                revoked.store(i + 1, Ordering::SeqCst);
            }
        }
    });
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let mut served = Vec::new();
    for i in 0..ROUNDS {
        rt.block_on(cache.verify(request(&key(i)))).unwrap();
        while revoked.load(Ordering::SeqCst) <= i {
            std::hint::spin_loop();
        }
        if cache.verify_now(&PresentedKey::new(&key(i))).is_some() {
            served.push(i);
        }
    }
    revoker.join().unwrap();
    let by_kind: Vec<usize> = (0..3).map(|k| served.iter().filter(|i| *i % 3 == k).count()).collect();
    assert!(
        served.is_empty(),
        "{} of {ROUNDS} revoked answers left cached (by key, digest, all: {by_kind:?})",
        served.len()
    );
}
