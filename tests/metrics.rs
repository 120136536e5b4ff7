//! What keygate counts (feature `metrics`), through a recording recorder, with requests sent over
//! loopback HTTP: decisions by outcome, cause and route; the verification cache; and no key in any
//! label. Each test installs its own recorder for its thread (tokio's current-thread runtime runs
//! the server there too), so tests in parallel do not see each other's numbers.
#![cfg(all(feature = "metrics", feature = "axum"))]

mod common;

use axum::routing::get;
use axum::Router;
use common::{fetch, request, serve_axum};
use keygate::cache::{CacheConfig, CachedVerifier};
use keygate::limit::RateLimit;
use keygate::observe;
use keygate::verify::BoxFuture;
use keygate::{ApiKeyLayer, KeyFacts, LocalVerifier, RoutePolicy, RouteTable, Scope, Verification, Verifier};
use keygate::{PresentedKey, VerifyError, VerifyRequest};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Every counter's value and every histogram's number of samples, as `name{label=value,…}`
/// (labels sorted). One snapshot: taking one drains the histograms.
fn read(snapshotter: &Snapshotter) -> (BTreeMap<String, u64>, BTreeMap<String, usize>) {
    let (mut counters, mut histograms) = (BTreeMap::new(), BTreeMap::new());
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let mut labels: Vec<String> = key.key().labels().map(|l| format!("{}={}", l.key(), l.value())).collect();
        labels.sort();
        let name = format!("{}{{{}}}", key.key().name(), labels.join(","));
        match value {
            DebugValue::Counter(n) => drop(counters.insert(name, n)),
            DebugValue::Histogram(samples) => drop(histograms.insert(name, samples.len())),
            DebugValue::Gauge(_) => {}
        }
    }
    (counters, histograms)
}

/// The counters of one metric.
fn of(all: &BTreeMap<String, u64>, name: &str) -> BTreeMap<String, u64> {
    all.iter().filter(|(k, _)| k.starts_with(&format!("{name}{{"))).map(|(k, v)| (k.clone(), *v)).collect()
}

fn scope(s: &str) -> Scope {
    s.parse().unwrap()
}

#[tokio::test]
async fn every_decision_is_counted_once_by_outcome_cause_and_route() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);

    let verifier = LocalVerifier::in_memory();
    let reader = verifier.create(KeyFacts::new("kid-reader").with_scopes([scope("items:read")])).await.unwrap().key;
    let limited = verifier.create(KeyFacts::new("kid-limited").with_scopes([scope("search:read")])).await.unwrap().key;
    let routes = RouteTable::new()
        .route("/items", "items")
        .route_with("/search", "search", RoutePolicy::new().rate_limit(RateLimit::per_minute("search", 1).unwrap()))
        .public("/health");
    let layer = ApiKeyLayer::builder(verifier).routes(routes).build().unwrap();
    let ok = || async { "ok" };
    let app = Router::new()
        .route("/items", get(ok).post(ok))
        .route("/search", get(ok))
        .route("/health", get(ok))
        .route("/elsewhere", get(ok))
        .layer(layer);
    let addr = serve_axum(app).await;
    let key = |k: &keygate::ApiKey| k.expose_secret().as_bytes().to_vec();
    let sends: Vec<(&str, &str, Option<Vec<u8>>, u16)> = vec![
        ("GET", "/items", Some(key(&reader)), 200),
        ("GET", "/items", Some(key(&reader)), 200),
        ("GET", "/items", None, 401),
        ("GET", "/items", Some(b"kg_forged".to_vec()), 401),
        ("POST", "/items", Some(key(&reader)), 403),
        ("GET", "/health", None, 200),
        ("GET", "/search", Some(key(&limited)), 200),
        ("GET", "/search", Some(key(&limited)), 429),
        ("GET", "/elsewhere", Some(key(&reader)), 200),
    ];
    for (method, path, key, status) in &sends {
        let headers: Vec<(&str, &[u8])> = key.iter().map(|k| ("x-api-key", k.as_slice())).collect();
        let reply = request(addr, method, path, &headers).await;
        assert_eq!(reply.status.as_u16(), *status, "{method} {path}");
    }

    let (all, _) = read(&snapshotter);
    let decisions = of(&all, observe::DECISIONS);
    let d = |outcome: &str, cause: &str, route: &str| {
        format!("{}{{cause={cause},outcome={outcome},route={route}}}", observe::DECISIONS)
    };
    let expected = BTreeMap::from([
        (d("pass", "key", "/items"), 2),
        (d("refused", "missing-key", "/items"), 1),
        (d("refused", "invalid-key", "/items"), 1),
        (d("refused", "insufficient-scope", "/items"), 1),
        (d("pass", "public", "/health"), 1),
        (d("pass", "key", "/search"), 1),
        (d("refused", "rate-limited", "/search"), 1),
        (d("pass", "key", "other"), 1),
    ]);
    assert_eq!(decisions, expected);
    // The accounting identity: one decision per request sent, no more, no fewer.
    assert_eq!(decisions.values().sum::<u64>(), sends.len() as u64);

    // No key, raw or in part, in any metric name or label.
    for name in all.keys() {
        for k in [&reader, &limited] {
            assert!(!name.contains(&k.expose_secret()[3..12]), "key material in {name}");
        }
        assert!(!name.contains("kg_forged"), "a presented key in {name}");
        assert!(!name.contains("kid-"), "a key id in {name}");
    }
}

/// A verifier that answers after a delay, and can be made to fail.
#[derive(Clone)]
struct Slow {
    inner: LocalVerifier,
    failing: Arc<AtomicBool>,
}

impl Verifier for Slow {
    fn verify(&self, request: VerifyRequest) -> BoxFuture<'static, Result<Verification, VerifyError>> {
        let (inner, failing) = (self.inner.clone(), self.failing.clone());
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if failing.load(Ordering::SeqCst) {
                return Err(VerifyError::new("down"));
            }
            inner.verify(request).await
        })
    }

    fn verify_now(&self, _: &PresentedKey<'_>) -> Option<Verification> {
        None
    }
}

#[tokio::test]
async fn cache_hits_misses_stale_serves_and_single_flight_joins_are_counted() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);

    let local = LocalVerifier::in_memory();
    let key = local.create(KeyFacts::new("k")).await.unwrap().key;
    let failing = Arc::new(AtomicBool::new(false));
    let config = CacheConfig::default().positive_ttl(Duration::from_millis(300)).max_stale(Duration::from_secs(60));
    let cached = CachedVerifier::new(Slow { inner: local, failing: failing.clone() }, config);
    let addr = serve_axum(Router::new().route("/", get(|| async { "ok" })).layer(ApiKeyLayer::new(cached))).await;
    let good = key.expose_secret().as_bytes();

    // Ten at once on a cold key: ten misses, nine of which join the first one's call.
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let good = good.to_vec();
        calls.spawn(async move { fetch(addr, "/", &[("x-api-key", &good)]).await.status });
    }
    while let Some(status) = calls.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }
    assert_eq!(fetch(addr, "/", &[("x-api-key", good)]).await.status, 200); // a hit
    for _ in 0..2 {
        assert_eq!(fetch(addr, "/", &[("x-api-key", b"kg_unknown")]).await.status, 401);
        // a miss, then a negative hit
    }
    // Past its TTL with the verifier down: a miss, then the stale answer.
    tokio::time::sleep(Duration::from_millis(350)).await;
    failing.store(true, Ordering::SeqCst);
    assert_eq!(fetch(addr, "/", &[("x-api-key", good)]).await.status, 200);

    let (all, _) = read(&snapshotter);
    let lookups = |result: &str| all.get(&format!("{}{{result={result}}}", observe::CACHE_LOOKUPS)).copied();
    assert_eq!(lookups("miss"), Some(12), "10 cold, 1 unknown, 1 expired");
    assert_eq!(lookups("hit"), Some(1));
    assert_eq!(lookups("negative_hit"), Some(1));
    assert_eq!(lookups("stale"), Some(1));
    assert_eq!(all.get(&format!("{}{{}}", observe::SINGLE_FLIGHT_JOINS)).copied(), Some(9));
}

/// Oneloop fails, the breaker opens, half-opens and closes; each verify call's latency is recorded
/// with its outcome; the usage batcher's classes add up to what was recorded.
#[cfg(feature = "oneloop")]
#[tokio::test]
async fn oneloop_calls_breaker_transitions_and_usage_classes_are_counted() {
    use common::oneloop::{answer, start, Behaviour, TOKEN};
    use keygate::breaker::BreakerConfig;
    use keygate::oneloop::{BatchConfig, OneloopVerifier, UsageBatcher};

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);

    let (upstream, fake) = start().await;
    fake.add("kg_good", answer("k", &["items:read"]));
    let breaker = BreakerConfig::default().failure_threshold(2).cool_down(Duration::from_millis(200));
    let oneloop =
        OneloopVerifier::builder(TOKEN).base_url(format!("http://{upstream}")).breaker(breaker).build().unwrap();
    let batcher = UsageBatcher::new(oneloop.clone(), BatchConfig::default());
    let routes = RouteTable::new().route_with("/items", "items", RoutePolicy::new().usage(2, None));
    let layer = ApiKeyLayer::builder(oneloop).routes(routes).usage_sink(batcher.clone()).build().unwrap();
    let addr = serve_axum(Router::new().route("/items", get(|| async { "ok" })).layer(layer)).await;
    let call = || fetch(addr, "/items", &[("x-api-key", b"kg_good")]);

    fake.set(Behaviour::Status500);
    for _ in 0..4 {
        assert_eq!(call().await.status, 503);
    }
    assert_eq!(fake.calls(), 2, "open after two failures");
    fake.set(Behaviour::Normal);
    tokio::time::sleep(Duration::from_millis(250)).await;
    for _ in 0..3 {
        assert_eq!(call().await.status, 200); // the probe closes it; then cached
    }
    let report = batcher.shutdown(Duration::from_secs(5)).await;

    let (all, histograms) = read(&snapshotter);
    let transitions = of(&all, observe::BREAKER_TRANSITIONS);
    let t = |to: &str| format!("{}{{to={to}}}", observe::BREAKER_TRANSITIONS);
    assert_eq!(transitions, BTreeMap::from([(t("open"), 1), (t("half_open"), 1), (t("closed"), 1)]));
    let units = |class: &str| all.get(&format!("{}{{class={class}}}", observe::USAGE_UNITS)).copied().unwrap_or(0);
    assert_eq!((units("recorded"), units("acknowledged")), (6, 6));
    assert_eq!((report.recorded, report.acknowledged), (6, 6), "the metrics agree with the report");
    let lost = units("rejected") + units("uncertain") + units("dropped") + report.unsent;
    assert_eq!(units("recorded"), units("acknowledged") + lost);
    let d =
        |outcome: &str, cause: &str| format!("{}{{cause={cause},outcome={outcome},route=/items}}", observe::DECISIONS);
    assert_eq!(all.get(&d("refused", "unavailable")).copied(), Some(4));
    assert_eq!(all.get(&d("pass", "key")).copied(), Some(3));

    let h = |call: &str, outcome: &str| {
        histograms.get(&format!("{}{{call={call},outcome={outcome}}}", observe::UPSTREAM_DURATION)).copied()
    };
    assert_eq!(h("verify", "down"), Some(2));
    assert_eq!(h("verify", "ok"), Some(1));
    assert_eq!(h("record_usage", "acknowledged"), Some(1));
}

/// The Redis limiter's decisions are timed by outcome; a Redis that stops answering (`SIGSTOP`) sends
/// requests to the fallback, counted by kind. On a Redis of the test's own.
#[cfg(feature = "redis")]
#[cfg_attr(not(keygate_redis_server), ignore = "needs redis-server on PATH")]
#[tokio::test]
async fn redis_limiter_latency_and_fallbacks_are_counted() {
    use common::own_redis::{free_port, OwnRedis};
    use keygate::limit::{Fallback, RedisLimiter};

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);

    let own = OwnRedis::start(free_port());
    let conn = keygate::RedisConnection::open(&own.url()).unwrap();
    let limiter = RedisLimiter::new(conn, "kgmetrics")
        .timeout(Duration::from_millis(250))
        .fallback(Fallback::Local { instances: 1 });
    let verifier = LocalVerifier::in_memory();
    let key = verifier.create(KeyFacts::new("k")).await.unwrap().key;
    let layer =
        ApiKeyLayer::builder(verifier).limiter(limiter).rate_limit(RateLimit::per_minute("default", 100).unwrap());
    let addr = serve_axum(Router::new().route("/", get(|| async { "ok" })).layer(layer.build().unwrap())).await;
    let sent = [("x-api-key", key.expose_secret().as_bytes())];

    for _ in 0..3 {
        assert_eq!(fetch(addr, "/", &sent).await.status, 200);
    }
    own.freeze();
    for _ in 0..2 {
        assert_eq!(fetch(addr, "/", &sent).await.status, 200); // decided by the local fallback
    }
    own.thaw();

    let (all, histograms) = read(&snapshotter);
    let timed = |outcome: &str| histograms.get(&format!("{}{{outcome={outcome}}}", observe::REDIS_DURATION)).copied();
    assert_eq!(timed("ok"), Some(3));
    assert_eq!(timed("timeout"), Some(2));
    assert_eq!(all.get(&format!("{}{{fallback=local}}", observe::LIMITER_FALLBACKS)).copied(), Some(2));
}

/// The Redis key store's lookups are timed by outcome, and a revocation published by one instance
/// is counted where it is received. On a Redis of the test's own.
#[cfg(feature = "redis")]
#[cfg_attr(not(keygate_redis_server), ignore = "needs redis-server on PATH")]
#[tokio::test]
async fn redis_key_store_lookups_and_revocations_received_are_counted() {
    use common::own_redis::{free_port, OwnRedis};
    use keygate::store::RedisKeyStore;

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);

    let own = OwnRedis::start(free_port());
    let store = RedisKeyStore::new(keygate::RedisConnection::open(&own.url()).unwrap(), "kgstore");
    let admin = LocalVerifier::new(store.clone());
    let key = admin.create(KeyFacts::new("k")).await.unwrap().key;
    let cached = CachedVerifier::new(LocalVerifier::new(store.clone()), CacheConfig::default());
    let cache = cached.clone();
    store.listen(move |revoked| cache.revoke(revoked));
    tokio::time::sleep(Duration::from_millis(200)).await; // reading the stream
    let addr = serve_axum(Router::new().route("/", get(|| async { "ok" })).layer(ApiKeyLayer::new(cached))).await;
    let sent = [("x-api-key", key.expose_secret().as_bytes())];

    assert_eq!(fetch(addr, "/", &sent).await.status, 200); // a lookup in Redis
    assert_eq!(fetch(addr, "/", &sent).await.status, 200); // cached
    admin.disable("k").await.unwrap(); // on the revocation stream every instance reads
    let mut refused = false;
    for _ in 0..100 {
        if fetch(addr, "/", &sent).await.status == 401 {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "the revocation reached the cache");

    let (all, histograms) = read(&snapshotter);
    assert_eq!(all.get(&format!("{}{{}}", observe::REVOCATIONS)).copied(), Some(1));
    let lookups = histograms.get(&format!("{}{{outcome=ok}}", observe::STORE_DURATION)).copied().unwrap_or(0);
    assert!(
        lookups >= 3,
        "the first request's, the admin's (disable looks the key up), the one after the revocation: {lookups}"
    );
}
