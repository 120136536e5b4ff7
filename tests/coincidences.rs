//! Configurations with a coincidence in them: the same limit twice, zero, the maximum, empty.
//! Each must be exact, never lift a limit, never panic, never turn every request into a 503.

mod common;

use axum::body::Body;
use axum::routing::get;
use axum::Router;
use http::{Request, StatusCode};
use keygate::limit::{LimitRequest, Limiter, MemoryLimiter, RateLimit};
use keygate::{ApiKeyLayer, KeyFacts, LocalVerifier, RoutePolicy, RouteTable};
use std::time::Duration;
use tower::ServiceExt;

async fn call(app: &Router, path: &str, key: &str) -> StatusCode {
    let req = Request::get(path).header("x-api-key", key).body(Body::empty()).unwrap();
    app.clone().oneshot(req).await.unwrap().status()
}

/// How many of `n` sequential requests pass.
async fn passes(app: &Router, path: &str, key: &str, n: usize) -> usize {
    let mut ok = 0;
    for _ in 0..n {
        let status = call(app, path, key).await;
        assert!(status == StatusCode::OK || status == StatusCode::TOO_MANY_REQUESTS, "{status}");
        ok += usize::from(status == StatusCode::OK);
    }
    ok
}

async fn key_with(facts: KeyFacts) -> (LocalVerifier, String) {
    let verifier = LocalVerifier::in_memory();
    let key = verifier.create(facts).await.unwrap().key.expose_secret().to_owned();
    (verifier, key)
}

fn app(layer: ApiKeyLayer) -> Router {
    Router::new().route("/a", get(|| async { "a" })).route("/b", get(|| async { "b" })).layer(layer)
}

/// The same limit on the layer and on a route is one limit: 5/min admits 5, on every route.
#[tokio::test]
async fn a_layer_limit_repeated_on_a_route_is_one_limit() {
    for limit in [5, 6] {
        let rl = RateLimit::per_minute("default", limit).unwrap();
        let (verifier, key) = key_with(KeyFacts::new("k").with_scopes(["x:*".parse().unwrap()])).await;
        let routes =
            RouteTable::new().route_with("/a", "x", RoutePolicy::new().rate_limit(rl.clone())).route("/b", "x");
        let layer = ApiKeyLayer::builder(verifier).routes(routes).rate_limit(rl).build().unwrap();
        let app = app(layer);
        assert_eq!(passes(&app, "/a", &key, 30).await as u64, limit, "{limit}/min on /a");
        assert_eq!(passes(&app, "/b", &key, 30).await, 0, "the one limit is spent for /b too");
    }
}

/// A key's own limit and the same limit from its metadata are one limit.
#[tokio::test]
async fn a_key_limit_repeated_in_metadata_is_one_limit() {
    for limit in [5u64, 6] {
        let facts = KeyFacts::new("k")
            .with_rate_limit(RateLimit::per_minute("key", limit).unwrap())
            .with_metadata("rl", format!("{limit}/min"));
        let (verifier, key) = key_with(facts).await;
        let layer = ApiKeyLayer::builder(verifier).rate_limit_from_metadata("rl").build().unwrap();
        let app = app(layer);
        assert_eq!(passes(&app, "/a", &key, 30).await as u64, limit, "{limit}/min");
        assert_eq!(passes(&app, "/b", &key, 10).await, 0);
    }
}

/// Two limits under one name but with other sizes or windows are two limits, each counted once.
#[tokio::test]
async fn one_name_two_sizes_are_two_limits() {
    let (verifier, key) = key_with(KeyFacts::new("k")).await;
    let layer = ApiKeyLayer::builder(verifier)
        .rate_limit(RateLimit::per_minute("default", 7).unwrap())
        .rate_limit(RateLimit::new("default", 4, Duration::from_secs(3600)).unwrap())
        .build()
        .unwrap();
    assert_eq!(passes(&app(layer), "/a", &key, 20).await, 4);
}

/// Straight through the limiter: a duplicate entry is one limit at the request's cost.
#[tokio::test]
async fn the_memory_limiter_counts_a_duplicate_once() {
    let limiter = MemoryLimiter::new();
    let rl = RateLimit::per_minute("d", 5).unwrap();
    let twice = [(rl.clone(), 1), (rl.clone(), 1)];
    let mut ok = 0;
    for _ in 0..30 {
        if let Ok(states) =
            limiter.check_now("k", &LimitRequest { limits: &twice, usage: None, identity: None }).unwrap()
        {
            ok += 1;
            assert_eq!(states.len(), 2, "one state per entry asked for");
            assert_eq!(states[0], states[1]);
            assert_eq!(states[0].remaining, 5 - ok);
        }
    }
    assert_eq!(ok, 5);
}

/// Windows and waits at the edge of `Duration` are refused or clamped, never overflow.
#[test]
fn absurd_durations_are_refused_when_built() {
    assert!(RateLimit::new("x", 1, Duration::MAX).is_err(), "a window of Duration::MAX");
    assert!(RateLimit::new("x", 1, Duration::from_secs(u64::MAX / 1000)).is_err());
    assert!(RateLimit::new("x", RateLimit::MAX_LIMIT, RateLimit::MAX_WINDOW).is_ok(), "the largest limit is fine");
    assert!(RateLimit::new("x", RateLimit::MAX_LIMIT + 1, Duration::from_secs(60)).is_err(), "past 2^53");
    assert!(RateLimit::new("x", u64::MAX, Duration::from_secs(60)).is_err());
    let built =
        ApiKeyLayer::builder(LocalVerifier::in_memory()).unavailable_retry_after(Duration::MAX).build().map(drop);
    assert!(built.is_err(), "unavailable_retry_after(Duration::MAX) is refused");
    let zero = ApiKeyLayer::builder(LocalVerifier::in_memory()).unavailable_retry_after(Duration::ZERO).build();
    assert!(zero.is_ok(), "zero means 'retry at once' and renders as 1 s");
}

/// A key whose metadata asks for a window of a thousand years: its metadata limit is ignored as
/// unreadable (logged), the key keeps working.
#[tokio::test]
async fn a_huge_metadata_window_is_unreadable_not_a_panic() {
    for text in ["5/99999999999999999s", "5/18446744073709551615s", "18446744073709551615/s", "0/s", "/", ""] {
        let (verifier, key) = key_with(KeyFacts::new("k").with_metadata("rl", text)).await;
        let layer = ApiKeyLayer::builder(verifier).rate_limit_from_metadata("rl").build().unwrap();
        let app = app(layer);
        let ok = passes(&app, "/a", &key, 3).await;
        // None of these is a limit: the key is served, the value logged as unreadable.
        assert_eq!(ok, 3, "{text:?}");
    }
}

/// The 503's Retry-After is rendered without overflow for the largest wait allowed.
#[test]
fn retry_after_of_the_largest_wait() {
    let r = keygate::Rejection::Unavailable { retry_after: Duration::MAX };
    let res = r.to_response();
    assert_eq!(res.status(), 503);
    let secs: u64 = res.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(secs >= 1);
    let r = keygate::Rejection::RateLimited { retry_after: Duration::new(u64::MAX, 999_999_999), limit: None };
    assert_eq!(r.to_response().status(), 429);
}
