//! With Oneloop down, or Redis frozen under the local fallback, N requests log O(1) lines at WARN
//! and above: state changes once, then a periodic summary; per-request detail stays at DEBUG.
#![cfg(any(feature = "oneloop", feature = "redis"))]
#![cfg_attr(not(feature = "oneloop"), allow(unused_imports, dead_code))]

mod common;

use axum::body::Body;
use axum::routing::get;
use axum::Router;
#[cfg(feature = "oneloop")]
use common::oneloop::{answer, start, Behaviour, TOKEN};
use http::{Request, StatusCode};
use keygate::cache::CacheConfig;
#[cfg(feature = "oneloop")]
use keygate::oneloop::OneloopVerifier;
use keygate::{ApiKeyLayer, RouteTable};
use std::io::Write;
use std::time::Duration;
use tower::ServiceExt;

async fn call(app: &Router, key: &str) -> StatusCode {
    let req = Request::get("/v1/items").header("x-api-key", key).body(Body::empty()).unwrap();
    app.clone().oneshot(req).await.unwrap().status()
}

#[cfg(feature = "oneloop")]
#[tokio::test] // current-thread: everything logs through this test's subscriber
async fn an_outage_logs_its_state_changes_not_every_request() {
    let (logs, _guard) = common::Captured::start(tracing::Level::DEBUG);

    let (addr, fake) = start().await;
    fake.add("warm", answer("key_warm", &["items:read"]));
    let oneloop = OneloopVerifier::builder(TOKEN)
        .base_url(format!("http://{addr}"))
        .cache(CacheConfig::default().positive_ttl(Duration::from_millis(1)))
        .build()
        .unwrap();
    let layer = ApiKeyLayer::builder(oneloop).routes(RouteTable::new().route("/v1/items", "items")).build().unwrap();
    let app = Router::new().route("/v1/items", get(|| async { "ok" })).layer(layer);
    assert_eq!(call(&app, "warm").await, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(5)).await;

    fake.set(Behaviour::Status500);
    for i in 0..200 {
        assert_eq!(call(&app, &format!("unknown-{i}")).await, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(call(&app, "warm").await, StatusCode::OK, "stale-if-error");
    }
    let loud: Vec<String> = logs.lines(" WARN ").into_iter().chain(logs.lines(" ERROR ")).collect();
    let _ = writeln!(std::io::stderr(), "{} WARN/ERROR lines for 400 requests with Oneloop down", loud.len());
    assert!(loud.len() <= 4, "{} WARN/ERROR lines for 400 requests:\n{}", loud.len(), loud.join("\n"));
    assert!(!loud.is_empty(), "the outage is said at least once");
    assert!(logs.lines(" DEBUG ").len() >= 200, "each refusal is still there at DEBUG");

    fake.set(Behaviour::Normal);
    tokio::time::sleep(Duration::from_secs(5)).await; // the breaker's cool-down
    assert_eq!(call(&app, "unknown-0").await, StatusCode::UNAUTHORIZED);
    let recovered = logs.lines(" INFO ");
    assert!(recovered.iter().any(|l| l.contains("recovered")), "{recovered:?}");
    // The breaker's states, each said once, in order: open (WARN), half-open, closed (INFO).
    let breaker: Vec<String> =
        logs.lines("circuit").into_iter().map(|l| l.split("keygate: ").last().unwrap().to_owned()).collect();
    let said = |what: &str| breaker.iter().filter(|l| l.starts_with(what)).count();
    let (open, half_open, closed) = (
        "verifier keeps failing; circuit open",
        "verifier cool-down over; circuit half-open",
        "verifier answered the probe",
    );
    assert_eq!((said(open), said(half_open), said(closed)), (1, 1, 1), "{breaker:#?}");
}

/// A frozen Redis under the local fallback: requests keep passing, and the logs say so once, not
/// per request; when it answers again, INFO once.
#[cfg(feature = "redis")]
#[cfg_attr(not(keygate_redis_server), ignore = "needs redis-server on PATH")]
#[tokio::test]
async fn a_frozen_redis_under_the_fallback_is_logged_once() {
    use common::own_redis::{free_port, OwnRedis};
    use keygate::limit::{Fallback, RateLimit, RedisLimiter};
    use keygate::{KeyFacts, LocalVerifier};

    let (logs, _guard) = common::Captured::start(tracing::Level::DEBUG);
    let own = OwnRedis::start(free_port());
    let conn = keygate::RedisConnection::open(&own.url()).unwrap();
    let limiter = RedisLimiter::new(conn, "kgquiet")
        .timeout(Duration::from_millis(50))
        .fallback(Fallback::Local { instances: 1 });
    let verifier = LocalVerifier::in_memory();
    let key = verifier.create(KeyFacts::new("k").with_scopes(["items:*".parse().unwrap()])).await.unwrap().key;
    let layer = ApiKeyLayer::builder(verifier)
        .routes(RouteTable::new().route("/v1/items", "items"))
        .limiter(limiter)
        .rate_limit(RateLimit::per_minute("default", 1000).unwrap())
        .build()
        .unwrap();
    let app = Router::new().route("/v1/items", get(|| async { "ok" })).layer(layer);
    let key = key.expose_secret();
    assert_eq!(call(&app, key).await, StatusCode::OK);

    own.freeze();
    for _ in 0..40 {
        assert_eq!(call(&app, key).await, StatusCode::OK, "the fallback decides");
    }
    let loud: Vec<String> = logs.lines(" WARN ").into_iter().chain(logs.lines(" ERROR ")).collect();
    assert_eq!(loud.len(), 1, "one line for 40 requests with Redis frozen:\n{}", loud.join("\n"));
    assert!(loud[0].contains("Redis (rate limits) is failing"), "{}", loud[0]);

    own.thaw();
    // The frozen connection was dropped as dead; a new one opens within the capped backoff.
    let thawed = std::time::Instant::now();
    let said = || logs.lines(" INFO ").iter().any(|l| l.contains("Redis (rate limits) recovered"));
    while !said() && thawed.elapsed() < Duration::from_secs(2) {
        assert_eq!(call(&app, key).await, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(said(), "recovered within 2 s: {:?}", logs.lines(" INFO "));
}
