//! The Redis limiter under faults it cannot see coming: a Redis that stalls (`SIGSTOP`) with
//! decisions queued in it. A request keygate did not admit on Redis's word never counts in Redis,
//! and what the local fallback admitted is counted once, against what Redis said was left.
//! Each test starts its own redis-server on a free loopback port.
#![cfg(feature = "redis")]

mod common;

use axum::body::Body;
use axum::routing::get;
use axum::Router;
use common::own_redis::{free_port, OwnRedis};
use http::{Request, StatusCode};
use keygate::limit::{Fallback, RateLimit, RedisLimiter};
use keygate::{ApiKeyLayer, KeyFacts, LocalVerifier, RoutePolicy, RouteTable};
use std::time::Duration;
use tower::ServiceExt;

async fn instance(url: &str, verifier: &LocalVerifier, fallback: Fallback, limit: Option<RateLimit>) -> Router {
    let conn = keygate::RedisConnection::open(url).unwrap();
    // Generous for a loaded 2-core CI machine; a frozen Redis still misses it.
    let limiter = RedisLimiter::new(conn, "kgfault").fallback(fallback).timeout(Duration::from_millis(250));
    let routes = RouteTable::new().route("/x", "x").route_with("/spend", "x", RoutePolicy::new().usage(1, None));
    let mut layer = ApiKeyLayer::builder(verifier.clone()).limiter(limiter).routes(routes);
    if let Some(limit) = limit {
        layer = layer.rate_limit(limit);
    }
    Router::new()
        .route("/x", get(|| async { "ok" }))
        .route("/spend", get(|| async { "ok" }))
        .layer(layer.build().unwrap())
}

async fn call(app: &Router, path: &str, key: &str) -> StatusCode {
    let req = Request::get(path).header("x-api-key", key).body(Body::empty()).unwrap();
    app.clone().oneshot(req).await.unwrap().status()
}

/// `n` concurrent requests; the statuses, counted.
async fn burst(app: &Router, path: &str, key: &str, n: usize) -> std::collections::BTreeMap<u16, usize> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (app, key, path) = (app.clone(), key.to_owned(), path.to_owned());
            tokio::spawn(async move { call(&app, &path, &key).await })
        })
        .collect();
    let mut statuses = std::collections::BTreeMap::new();
    for t in tasks {
        *statuses.entry(t.await.unwrap().as_u16()).or_insert(0) += 1;
    }
    statuses
}

async fn passes(app: &Router, path: &str, key: &str, n: usize) -> usize {
    let mut ok = 0;
    for _ in 0..n {
        ok += usize::from(call(app, path, key).await == StatusCode::OK);
    }
    ok
}

async fn key(verifier: &LocalVerifier, facts: KeyFacts) -> String {
    verifier.create(facts.with_scopes(["x:*".parse().unwrap()])).await.unwrap().key.expose_secret().to_owned()
}

/// Redis freezes with decisions queued; keygate answers 503 for them. When Redis runs them later,
/// they take nothing: the window still has exactly what it had.
#[cfg_attr(not(keygate_redis_server), ignore = "needs redis-server on PATH")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_charges_nothing_for_requests_refused_with_503() {
    let own = OwnRedis::start(free_port());
    let verifier = LocalVerifier::in_memory();
    let key = key(&verifier, KeyFacts::new("k").with_usage_limit(10)).await;
    let limit = RateLimit::per_minute("default", 5).unwrap();
    let app = instance(&own.url(), &verifier, Fallback::FailClosed, Some(limit)).await;
    assert_eq!(passes(&app, "/spend", &key, 2).await, 2);

    own.freeze();
    let refused = burst(&app, "/spend", &key, 20).await;
    assert_eq!(refused, [(503, 20)].into(), "no decision without Redis");
    own.thaw();
    tokio::time::sleep(Duration::from_millis(500)).await; // the queued decisions and their cancels run

    // 3 of the 5 are left, and 8 of the 10 units of usage.
    assert_eq!(passes(&app, "/spend", &key, 10).await, 3, "the 503s took nothing from the window");
    let usage_only = instance(&own.url(), &verifier, Fallback::FailClosed, None).await;
    assert_eq!(passes(&usage_only, "/spend", &key, 10).await, 5, "nor from the usage balance (10 - 2 - 3)");
}

/// Two instances spend `before` each through Redis (alternating, so each has a fresh answer), then
/// Redis freezes and each gets `during` requests at once; then Redis thaws and each gets 10 more.
/// Returns the 200s during the outage and after it.
async fn outage(
    own: &OwnRedis,
    apps: [&Router; 2],
    path: &str,
    key: &str,
    before: usize,
    during: usize,
) -> (usize, usize) {
    for _ in 0..before {
        for app in apps {
            assert_eq!(call(app, path, key).await, StatusCode::OK);
        }
    }
    own.freeze();
    let mut admitted = 0;
    for app in apps {
        admitted += burst(app, path, key, during).await.get(&200).copied().unwrap_or(0);
    }
    own.thaw();
    tokio::time::sleep(Duration::from_millis(500)).await; // queued decisions, cancels and payments run
    let mut after = 0;
    for app in apps {
        after += passes(app, path, key, 10).await;
    }
    (admitted, after)
}

/// Two instances with a local fallback. Redis said 40 of 60 were left when it froze: together the
/// fallbacks admit those 40 (20 each, their share), not 60 more; when Redis thaws, what they
/// admitted is added to its counters once, so the window stays spent.
#[cfg_attr(not(keygate_redis_server), ignore = "needs redis-server on PATH")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fallback_admits_its_share_of_what_was_left_and_redis_learns_of_it() {
    let own = OwnRedis::start(free_port());
    let verifier = LocalVerifier::in_memory();
    let key = key(&verifier, KeyFacts::new("k")).await;
    let limit = RateLimit::per_minute("default", 60).unwrap();
    let fallback = Fallback::Local { instances: 2 };
    let a = instance(&own.url(), &verifier, fallback, Some(limit.clone())).await;
    let b = instance(&own.url(), &verifier, fallback, Some(limit)).await;
    let (admitted, after) = outage(&own, [&a, &b], "/x", &key, 10, 30).await;
    assert_eq!(admitted, 40, "the two shares of the 40 left");
    assert_eq!(after, 0, "60 were admitted in this window: 20 by Redis, 40 by the fallbacks");
}

/// The same for a usage balance: 100 credits, 40 spent through Redis; frozen, the fallbacks spend
/// their shares of the 60 left (each its half of what Redis last told it); thawed, the balance is
/// spent and stays spent.
#[cfg_attr(not(keygate_redis_server), ignore = "needs redis-server on PATH")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balance_spent_during_an_outage_is_spent_once() {
    let own = OwnRedis::start(free_port());
    let verifier = LocalVerifier::in_memory();
    let key = key(&verifier, KeyFacts::new("k").with_usage_limit(100)).await;
    let fallback = Fallback::Local { instances: 2 };
    let a = instance(&own.url(), &verifier, fallback, None).await;
    let b = instance(&own.url(), &verifier, fallback, None).await;
    let (spent, after) = outage(&own, [&a, &b], "/spend", &key, 20, 40).await;
    assert_eq!(spent, 60, "the two shares of the 60 credits left");
    assert_eq!(after, 0, "100 credits, spent exactly once");
}

/// Redis restarts: the first uncached lookup on each instance meets the dead connection. It is
/// retried once on the new one, not answered with a 503.
#[cfg_attr(not(keygate_redis_server), ignore = "needs redis-server on PATH")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_lookup_after_a_restart_is_not_a_503() {
    let port = free_port();
    let mut own = OwnRedis::start(port);
    let store = keygate::store::RedisKeyStore::new(keygate::RedisConnection::open(&own.url()).unwrap(), "kgrestart")
        .timeout(Duration::from_secs(2));
    let verifier = LocalVerifier::new(store);
    let first = key(&verifier, KeyFacts::new("k1")).await;
    let app = Router::new().route("/x", get(|| async { "ok" })).layer(ApiKeyLayer::new(verifier));
    assert_eq!(call(&app, "/x", &first).await, StatusCode::OK);

    own.stop();
    let _own = OwnRedis::start(port);
    // The restarted Redis kept nothing: an admin (on a connection of its own) adds a key again.
    let admin = LocalVerifier::new(keygate::store::RedisKeyStore::new(
        keygate::RedisConnection::open(&format!("redis://127.0.0.1:{port}")).unwrap(),
        "kgrestart",
    ));
    let second = key(&admin, KeyFacts::new("k2")).await;
    assert_eq!(call(&app, "/x", &second).await, StatusCode::OK, "the first lookup after the restart");
}
