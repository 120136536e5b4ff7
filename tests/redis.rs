//! Many instances sharing limits, usage and revocations through Redis. Needs `REDIS_URL` (CI sets
//! it); without it those tests are reported as ignored. Tests that start their own redis-server are
//! ignored where there is none.
#![cfg(feature = "redis")]

mod common;

use axum::body::Body;
use axum::routing::get;
use axum::Router;
use common::own_redis::{free_port, OwnRedis};
use http::{Request, StatusCode};
use keygate::cache::{CacheConfig, CachedVerifier};
use keygate::limit::{Fallback, LimitRequest, Limiter, RateLimit, RedisLimiter};
use keygate::store::RedisKeyStore;
use keygate::{ApiKeyLayer, KeyFacts, LocalVerifier, RoutePolicy, RouteTable};
use std::time::{Duration, Instant};
use tower::ServiceExt;

/// The shared Redis. Tests that use it are ignored (not passed) when `REDIS_URL` was not set at
/// build time; see build.rs.
fn redis_url() -> String {
    std::env::var("REDIS_URL").expect("REDIS_URL is set (this test is ignored otherwise)")
}

/// A prefix no other test (or earlier run) uses.
fn prefix(test: &str) -> String {
    let mut n = [0u8; 8];
    getrandom::fill(&mut n).unwrap();
    format!("kgtest:{test}:{}", u64::from_le_bytes(n))
}

/// One instance: its own Redis clients, its own cache, listening for revocations.
struct Instance {
    app: Router,
    verifier: LocalVerifier,
}

async fn instance(
    url: &str,
    prefix: &str,
    configure: impl FnOnce(keygate::ApiKeyLayerBuilder) -> keygate::ApiKeyLayerBuilder,
) -> Instance {
    let conn = keygate::RedisConnection::open(url).unwrap();
    let store = RedisKeyStore::new(conn.clone(), prefix);
    let verifier = LocalVerifier::new(store.clone());
    let cached = CachedVerifier::new(verifier.clone(), CacheConfig::default());
    let cache = cached.clone();
    store.listen(move |revoked| cache.revoke(revoked));
    // A thousand concurrent requests on a debug build queue up at Redis: these tests are about exact
    // counts, so they allow slow answers (the outage test below keeps the 50 ms default).
    let limiter = RedisLimiter::new(conn, prefix).timeout(Duration::from_secs(5));
    let routes = RouteTable::new().route("/x", "x").route_with("/spend", "x", RoutePolicy::new().usage(1, None));
    let layer = configure(ApiKeyLayer::builder(cached).limiter(limiter).routes(routes)).build().unwrap();
    let app = Router::new().route("/x", get(|| async { "ok" })).route("/spend", get(|| async { "ok" })).layer(layer);
    Instance { app, verifier }
}

async fn call(app: &Router, path: &str, key: &str) -> StatusCode {
    let req = Request::get(path).header("x-api-key", key).body(Body::empty()).unwrap();
    app.clone().oneshot(req).await.unwrap().status()
}

/// Fires `per_instance` concurrent requests at each instance; counts the 200s.
async fn storm(instances: &[Instance], path: &'static str, key: &str, per_instance: usize) -> usize {
    let mut tasks = Vec::new();
    for inst in instances {
        for _ in 0..per_instance {
            let (app, key) = (inst.app.clone(), key.to_owned());
            tasks.push(tokio::spawn(async move { call(&app, path, &key).await }));
        }
    }
    let mut statuses = std::collections::BTreeMap::new();
    for t in tasks {
        *statuses.entry(t.await.unwrap().as_u16()).or_insert(0) += 1;
    }
    // Everything not admitted must be a refusal by the limit, never an error.
    assert!(statuses.keys().all(|s| *s == 200 || *s == 429), "{statuses:?}");
    statuses.get(&200).copied().unwrap_or(0)
}

async fn four(
    url: &str,
    prefix: &str,
    configure: fn(keygate::ApiKeyLayerBuilder) -> keygate::ApiKeyLayerBuilder,
) -> Vec<Instance> {
    let mut v = Vec::new();
    for _ in 0..4 {
        v.push(instance(url, prefix, configure).await);
    }
    v
}

#[cfg_attr(not(keygate_redis_url), ignore = "needs REDIS_URL")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_instances_share_one_limit() {
    let url = redis_url();
    let prefix = prefix("limit");
    let instances = four(&url, &prefix, |b| b.rate_limit(RateLimit::per_minute("default", 300).unwrap())).await;
    let key = instances[0].verifier.create(KeyFacts::new("k").with_scopes(["x:*".parse().unwrap()])).await.unwrap().key;
    assert_eq!(storm(&instances, "/x", key.expose_secret(), 250).await, 300);
}

#[cfg_attr(not(keygate_redis_url), ignore = "needs REDIS_URL")]
#[tokio::test]
async fn a_denied_limit_consumes_nothing_from_the_other() {
    let url = redis_url();
    let conn = keygate::RedisConnection::open(&url).unwrap();
    let limiter = RedisLimiter::new(conn, &prefix("two"));
    let wide = RateLimit::per_minute("wide", 10).unwrap();
    let narrow = RateLimit::per_minute("narrow", 2).unwrap();
    let both = [(wide.clone(), 1), (narrow.clone(), 1)];
    let check = |limits: &[(RateLimit, u64)]| limiter.check("k", &LimitRequest { limits, usage: None, identity: None });
    assert!(check(&both).await.unwrap().is_ok());
    assert!(check(&both).await.unwrap().is_ok());
    for _ in 0..5 {
        match check(&both).await.unwrap() {
            Err(keygate::limit::Refusal::Rate(denied)) => {
                assert_eq!(denied.limit, narrow);
                assert!(denied.retry_after <= Duration::from_secs(60) && denied.retry_after > Duration::from_secs(55));
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(check(&[(wide, 1)]).await.unwrap().unwrap()[0].remaining, 7, "the refusals took nothing");
}

#[cfg_attr(not(keygate_redis_url), ignore = "needs REDIS_URL")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balance_is_spent_once_across_instances() {
    let url = redis_url();
    let prefix = prefix("usage");
    let instances = four(&url, &prefix, |b| b).await;
    let facts = KeyFacts::new("k").with_scopes(["x:*".parse().unwrap()]).with_usage_limit(1_000);
    let key = instances[0].verifier.create(facts).await.unwrap().key;
    assert_eq!(storm(&instances, "/spend", key.expose_secret(), 300).await, 1_000);
    let mut conn = keygate::RedisConnection::open(&url).unwrap();
    let spent: u64 =
        redis::cmd("HGET").arg(format!("{prefix}:{{k}}:usage")).arg("local").query_async(&mut conn).await.unwrap();
    assert_eq!(spent, 1_000, "the balance of 1 000 ends at exactly 0");
}

#[cfg_attr(not(keygate_redis_url), ignore = "needs REDIS_URL")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_reaches_every_instance_within_100_ms() {
    let url = redis_url();
    let prefix = prefix("revoke");
    let instances = four(&url, &prefix, |b| b).await;
    let key = instances[0].verifier.create(KeyFacts::new("k").with_scopes(["x:*".parse().unwrap()])).await.unwrap().key;
    let key = key.expose_secret();
    for inst in &instances {
        assert_eq!(call(&inst.app, "/x", key).await, StatusCode::OK); // cached, positive TTL 30 s
    }
    tokio::time::sleep(Duration::from_millis(100)).await; // subscriptions are up
    let revoked = Instant::now();
    instances[0].verifier.disable("k").await.unwrap();
    for (i, inst) in instances.iter().enumerate().skip(1) {
        loop {
            if call(&inst.app, "/x", key).await == StatusCode::UNAUTHORIZED {
                break;
            }
            assert!(revoked.elapsed() < Duration::from_millis(100), "instance {} still accepts the key", i + 1);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    eprintln!("revocation reached instances 2 to 4 in {:?}", revoked.elapsed());
    // Rotation too: the old secret stops everywhere, the new one works.
    instances[0].verifier.enable("k").await.unwrap();
    let new = instances[0].verifier.rotate("k", std::time::Duration::ZERO).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    for inst in &instances[1..] {
        assert_eq!(call(&inst.app, "/x", key).await, StatusCode::UNAUTHORIZED);
        assert_eq!(call(&inst.app, "/x", new.expose_secret()).await, StatusCode::OK);
    }
}

#[cfg_attr(not(keygate_redis_server), ignore = "needs redis-server on PATH")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_the_fallback_decides_within_the_timeout_and_it_recovers() {
    let port = free_port();
    let mut own = OwnRedis::start(port);
    let url = format!("redis://127.0.0.1:{}", own.port);
    let verifier = LocalVerifier::in_memory();
    let key = verifier.create(KeyFacts::new("k")).await.unwrap().key;
    let key = key.expose_secret();
    let limit = RateLimit::per_minute("default", 40).unwrap();
    let mut apps = Vec::new();
    let mut limiters = Vec::new();
    for fallback in [Fallback::FailClosed, Fallback::Local { instances: 4 }] {
        let conn = keygate::RedisConnection::open(url.as_str()).unwrap();
        let limiter = std::sync::Arc::new(RedisLimiter::new(conn, &prefix("down")).fallback(fallback));
        let layer =
            ApiKeyLayer::builder(verifier.clone()).limiter(limiter.clone()).rate_limit(limit.clone()).build().unwrap();
        apps.push(Router::new().route("/x", get(|| async { "ok" })).layer(layer));
        limiters.push(limiter);
    }
    assert_eq!(call(&apps[0], "/x", key).await, StatusCode::OK);
    assert_eq!(call(&apps[1], "/x", key).await, StatusCode::OK);

    own.stop();
    let started = Instant::now();
    assert_eq!(call(&apps[0], "/x", key).await, StatusCode::SERVICE_UNAVAILABLE, "fail-closed");
    assert!(started.elapsed() < Duration::from_millis(500), "decided in {:?}", started.elapsed());
    let (mut passed, mut slowest) = (0, Duration::ZERO);
    for _ in 0..20 {
        let started = Instant::now();
        passed += usize::from(call(&apps[1], "/x", key).await == StatusCode::OK);
        slowest = slowest.max(started.elapsed());
    }
    // 50 ms timeout, plus scheduling slack on a loaded CI machine.
    assert!(slowest < Duration::from_millis(500), "slowest fallback decision {slowest:?}");
    let _ = std::io::Write::write_fmt(&mut std::io::stderr(), format_args!("slowest fallback decision: {slowest:?}\n"));
    // Redis last said 39 of 40 were left: this instance's share is 39 / 4 instances.
    assert_eq!(passed, 9, "the local share of what Redis said was left");
    assert!(limiters[0].fallbacks() >= 1 && limiters[1].fallbacks() >= 20);

    // Redis comes back on the same port: the limiter reconnects by itself.
    let _own = OwnRedis::start(port);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let before = limiters[0].fallbacks();
        if call(&apps[0], "/x", key).await == StatusCode::OK && limiters[0].fallbacks() == before {
            break;
        }
        assert!(Instant::now() < deadline, "the limiter did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The same limit on the layer and on a route, or listed twice to the limiter, is one limit in
/// Redis too: 5/min admits 5, not 3.
#[cfg_attr(not(keygate_redis_url), ignore = "needs REDIS_URL")]
#[tokio::test]
async fn the_same_limit_twice_is_one_limit_in_redis() {
    let url = redis_url();
    let p = prefix("twice");
    let rl = RateLimit::per_minute("default", 5).unwrap();
    let (layer_rl, route_rl) = (rl.clone(), rl.clone());
    let inst = instance(&url, &p, move |b| {
        let routes = RouteTable::new().route_with("/x", "x", RoutePolicy::new().rate_limit(route_rl));
        b.routes(routes).rate_limit(layer_rl)
    })
    .await;
    let key = inst.verifier.create(KeyFacts::new("k").with_scopes(["x:*".parse().unwrap()])).await.unwrap().key;
    let mut ok = 0;
    for _ in 0..30 {
        ok += usize::from(call(&inst.app, "/x", key.expose_secret()).await == StatusCode::OK);
    }
    assert_eq!(ok, 5);

    let conn = keygate::RedisConnection::open(url.as_str()).unwrap();
    let limiter = RedisLimiter::new(conn, &prefix("twice-direct"));
    let twice = [(rl.clone(), 1), (rl.clone(), 1)];
    let mut remaining = Vec::new();
    for _ in 0..10 {
        if let Ok(states) =
            limiter.check("k", &LimitRequest { limits: &twice, usage: None, identity: None }).await.unwrap()
        {
            assert_eq!(states.len(), 2);
            remaining.push(states[0].remaining);
        }
    }
    assert_eq!(remaining, [4, 3, 2, 1, 0]);
}
