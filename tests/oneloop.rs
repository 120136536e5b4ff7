//! The remote verifier and the cache, against a loopback Oneloop that follows the spec.
#![cfg(all(feature = "oneloop", feature = "axum"))]

mod common;

use axum::body::Body;
use axum::routing::get;
use axum::Router;
use common::oneloop::{answer, millis_from_now, start, Behaviour, TOKEN};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use keygate::breaker::BreakerConfig;
use keygate::cache::CacheConfig;
use keygate::oneloop::{Mode, OneloopBuilder, OneloopVerifier};
use keygate::{ApiKeyLayer, ApiKeyLayerBuilder, KeyFormat, RouteTable, VerifiedKey};
use serde_json::json;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tower::ServiceExt;

async fn who(key: VerifiedKey) -> String {
    let flag = if key.is_fail_open() {
        "fail-open"
    } else if key.is_stale() {
        "stale"
    } else {
        "fresh"
    };
    format!("{}|{}|{}", key.id(), key.customer_id().unwrap_or("-"), flag)
}

fn app(layer: ApiKeyLayer) -> Router {
    Router::new()
        .route("/v1/items", get(who).post(who))
        .route("/v1/items/{id}", get(who).put(who).delete(who))
        .route("/v1/admin/stats", get(who))
        .layer(layer)
}

fn routes() -> RouteTable {
    RouteTable::new().route("/v1/items", "items").route("/v1/items/{id}", "items").route("/v1/admin/stats", "admin")
}

struct Setup {
    app: Router,
    oneloop: OneloopVerifier,
    layer: ApiKeyLayer,
}

fn setup(
    addr: SocketAddr,
    verifier: impl FnOnce(OneloopBuilder) -> OneloopBuilder,
    layer: impl FnOnce(ApiKeyLayerBuilder) -> ApiKeyLayerBuilder,
) -> Setup {
    let builder =
        OneloopVerifier::builder(TOKEN).base_url(format!("http://{addr}")).timeout(Duration::from_millis(500));
    let oneloop = verifier(builder).build().unwrap();
    let layer = layer(ApiKeyLayer::builder(oneloop.clone()).routes(routes())).build().unwrap();
    Setup { app: app(layer.clone()), oneloop, layer }
}

async fn call(app: &Router, method: &str, path: &str, key: &str) -> (StatusCode, String) {
    let req = Request::builder().method(method).uri(path).header("x-api-key", key).body(Body::empty()).unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// `n` concurrent `GET /v1/items` with `key`, each on its own task.
fn spawn_calls(app: &Router, key: &'static str, n: usize) -> Vec<tokio::task::JoinHandle<(StatusCode, String)>> {
    (0..n)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { call(&app, "GET", "/v1/items", key).await })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_misses_make_one_call() {
    let (addr, fake) = start().await;
    fake.add("key-a", answer("key_a", &["items:read"]));
    fake.set_delay(Duration::from_millis(200));
    let s = setup(addr, |b| b, |l| l);
    for task in spawn_calls(&s.app, "key-a", 1000) {
        assert_eq!(task.await.unwrap(), (StatusCode::OK, "key_a|-|fresh".into()));
    }
    assert_eq!(fake.calls(), 1);
    assert_eq!(s.oneloop.cache().unwrap().in_flight(), 0);
    fake.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_leader_leaves_nobody_hanging() {
    let (addr, fake) = start().await;
    fake.add("key-a", answer("key_a", &["items:read"]));
    fake.set_delay(Duration::from_millis(300));
    let s = setup(addr, |b| b, |l| l);
    let leader = spawn_calls(&s.app, "key-a", 1).remove(0);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let followers = spawn_calls(&s.app, "key-a", 999);
    tokio::time::sleep(Duration::from_millis(50)).await;
    leader.abort(); // mid-call
    let all = tokio::time::timeout(Duration::from_secs(10), async {
        for f in followers {
            assert_eq!(f.await.unwrap().0, StatusCode::OK);
        }
    });
    all.await.expect("a follower hung after its leader was cancelled");
    assert!(fake.calls() <= 2, "the leader's call and at most one retry: {}", fake.calls());
    assert_eq!(s.oneloop.cache().unwrap().in_flight(), 0);
}

#[tokio::test]
async fn one_verify_serves_every_route_and_scope_is_decided_from_the_cache() {
    let (addr, fake) = start().await;
    let mut a = answer("key_r", &["items:read"]);
    a["customerId"] = "cus_1".into();
    a["metadata"] = json!({"plan": "pro"});
    fake.add("reader", a);
    let s = setup(addr, |b| b, |l| l);
    assert_eq!(call(&s.app, "GET", "/v1/items", "reader").await, (StatusCode::OK, "key_r|cus_1|fresh".into()));
    assert_eq!(call(&s.app, "GET", "/v1/items/7", "reader").await.0, StatusCode::OK);
    let (status, body) = call(&s.app, "POST", "/v1/items", "reader").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(body.contains("items:create"), "{body}");
    assert_eq!(call(&s.app, "GET", "/v1/admin/stats", "reader").await.0, StatusCode::FORBIDDEN);
    assert_eq!(fake.calls(), 1, "one upstream call for all four requests");
    // Cached mode asks Oneloop what the key is, not about a route.
    let sent = fake.last_verify.lock().unwrap().clone().unwrap();
    assert_eq!(sent["requestedScopes"], json!([]));
    assert!(sent.get("route").is_none());
    fake.assert_no_violations();
}

#[tokio::test]
async fn revocation_invalidation_ttl_and_expiry() {
    let (addr, fake) = start().await;
    fake.add("key-a", answer("key_a", &["items:*"]));
    let ttl = Duration::from_millis(400);
    let s = setup(addr, |b| b.cache(CacheConfig::default().positive_ttl(ttl).max_stale(Duration::ZERO)), |l| l);

    assert_eq!(call(&s.app, "GET", "/v1/items", "key-a").await.0, StatusCode::OK);
    fake.patch("key-a", "status", "DISABLED".into());
    // Within the TTL the cached answer stands...
    assert_eq!(call(&s.app, "GET", "/v1/items", "key-a").await.0, StatusCode::OK);
    assert_eq!(fake.calls(), 1);
    // ...and invalidate makes the next request ask again.
    s.oneloop.invalidate("key-a");
    assert_eq!(call(&s.app, "GET", "/v1/items", "key-a").await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(fake.calls(), 2);

    // Without invalidate, a revoked key stops within the positive TTL.
    fake.add("key-b", answer("key_b", &["items:*"]));
    assert_eq!(call(&s.app, "GET", "/v1/items", "key-b").await.0, StatusCode::OK);
    fake.patch("key-b", "status", "DELETED".into());
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    assert_eq!(call(&s.app, "GET", "/v1/items", "key-b").await.0, StatusCode::UNAUTHORIZED);

    // A key expiring inside the TTL stops at its expiry (milliseconds here), with no new call.
    let long = setup(addr, |b| b, |l| l);
    let mut a = answer("key_c", &["items:*"]);
    a["expiresAt"] = millis_from_now(Duration::from_millis(300)).into();
    fake.add("key-c", a);
    let before = fake.calls();
    assert_eq!(call(&long.app, "GET", "/v1/items", "key-c").await.0, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(call(&long.app, "GET", "/v1/items", "key-c").await.0, StatusCode::UNAUTHORIZED);
    assert!(fake.calls() <= before + 2);

    // Seconds work too: an expiry in the past is refused, one far ahead is not.
    let mut a = answer("key_d", &["items:*"]);
    a["expiresAt"] = (SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() - 10).into();
    fake.add("key-d", a);
    assert_eq!(call(&long.app, "GET", "/v1/items", "key-d").await.0, StatusCode::UNAUTHORIZED);
    let mut a = answer("key_e", &["items:*"]);
    a["expiresAt"] = (SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 3600).into();
    fake.add("key-e", a);
    assert_eq!(call(&long.app, "GET", "/v1/items", "key-e").await.0, StatusCode::OK);
    fake.assert_no_violations();
}

#[tokio::test]
async fn upstream_failures_give_503_and_never_a_pass() {
    let (addr, fake) = start().await;
    fake.add("key-a", answer("key_a", &["items:*"]));
    let no_breaker = |b: OneloopBuilder| {
        b.breaker(BreakerConfig::default().failure_threshold(0)).timeout(Duration::from_millis(200))
    };
    for behaviour in [
        Behaviour::Status500,
        Behaviour::Garbage,
        Behaviour::WrongTypes,
        Behaviour::Huge,
        Behaviour::Unauthorized,
        Behaviour::Hang,
    ] {
        fake.set(behaviour);
        let s = setup(addr, no_breaker, |l| l);
        let (status, body) = call(&s.app, "GET", "/v1/items", "key-a").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{behaviour:?}: {body}");
        assert!(body.contains("urn:keygate:problem:unavailable"));
    }
    // Connection refused: a port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let s = setup(closed, no_breaker, |l| l);
    assert_eq!(call(&s.app, "GET", "/v1/items", "key-a").await.0, StatusCode::SERVICE_UNAVAILABLE);
    // A wrong workspace token is Oneloop's 401, but the end user gets 503, not 401.
    fake.set(Behaviour::Normal);
    let wrong = OneloopVerifier::builder("ws_wrong").base_url(format!("http://{addr}")).build().unwrap();
    let app = app(ApiKeyLayer::builder(wrong).routes(routes()).build().unwrap());
    assert_eq!(call(&app, "GET", "/v1/items", "key-a").await.0, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn the_circuit_breaker_cuts_calls_while_open() {
    let (addr, fake) = start().await;
    fake.add("key-a", answer("key_a", &["items:*"]));
    fake.set(Behaviour::Status500);
    let cool_down = Duration::from_millis(500);
    let s = setup(addr, |b| b.breaker(BreakerConfig::default().failure_threshold(3).cool_down(cool_down)), |l| l);
    for _ in 0..3 {
        assert_eq!(call(&s.app, "GET", "/v1/items", "key-a").await.0, StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!(fake.calls(), 3);
    assert!(s.oneloop.circuit_open());
    for _ in 0..50 {
        let req = Request::get("/v1/items").header("x-api-key", "key-a").body(Body::empty()).unwrap();
        let res = s.app.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(res.headers()["retry-after"], "1", "the cool-down's remainder, rounded up");
    }
    assert_eq!(fake.calls(), 3, "no upstream call while open");
    // After the cool-down one probe goes through; it succeeds and closes the circuit.
    fake.set(Behaviour::Normal);
    tokio::time::sleep(cool_down + Duration::from_millis(50)).await;
    assert_eq!(call(&s.app, "GET", "/v1/items", "key-a").await.0, StatusCode::OK);
    assert_eq!(fake.calls(), 4);
    assert!(!s.oneloop.circuit_open());
}

#[tokio::test]
async fn stale_if_error_and_fail_open() {
    let (addr, fake) = start().await;
    fake.add("key-a", answer("key_a", &["items:*"]));
    let ttl = Duration::from_millis(200);
    let cache = CacheConfig::default().positive_ttl(ttl).max_stale(Duration::from_secs(30));
    let s = setup(addr, |b| b.cache(cache), |l| l);
    assert_eq!(call(&s.app, "GET", "/v1/items", "key-a").await.1, "key_a|-|fresh");
    fake.set(Behaviour::Status500);
    tokio::time::sleep(ttl + Duration::from_millis(50)).await;
    assert_eq!(call(&s.app, "GET", "/v1/items", "key-a").await, (StatusCode::OK, "key_a|-|stale".into()));
    // A key never seen has no stale answer: fail closed.
    assert_eq!(call(&s.app, "GET", "/v1/items", "key-new").await.0, StatusCode::SERVICE_UNAVAILABLE);

    // Stale never outlives the key's expiry.
    fake.set(Behaviour::Normal);
    let mut a = answer("key_x", &["items:*"]);
    a["expiresAt"] = millis_from_now(Duration::from_millis(500)).into();
    fake.add("key-x", a);
    assert_eq!(call(&s.app, "GET", "/v1/items", "key-x").await.0, StatusCode::OK);
    fake.set(Behaviour::Status500);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_ne!(call(&s.app, "GET", "/v1/items", "key-x").await.0, StatusCode::OK);

    // Fail-open is explicit, flagged and counted.
    let open = setup(addr, |b| b, |l| l.fail_open(true));
    assert_eq!(call(&open.app, "GET", "/v1/items", "key-new").await, (StatusCode::OK, "|-|fail-open".into()));
    assert_eq!(open.layer.fail_open_count(), 1);
}

#[tokio::test]
async fn per_request_mode_sends_scope_route_and_calls_every_time() {
    let (addr, fake) = start().await;
    fake.add("key-a", answer("key_a", &["items:read"]));
    let s = setup(addr, |b| b.mode(Mode::PerRequest), |l| l);
    assert_eq!(call(&s.app, "GET", "/v1/items/3", "key-a").await.0, StatusCode::OK);
    assert_eq!(call(&s.app, "GET", "/v1/items/3", "key-a").await.0, StatusCode::OK);
    assert_eq!(fake.calls(), 2);
    let sent = fake.last_verify.lock().unwrap().clone().unwrap();
    assert_eq!(
        sent["requestedScopes"],
        json!([{"representation": "items", "create": false, "read": true, "update": false, "del": false}])
    );
    assert_eq!(sent["route"], "/v1/items/{id}");
    // Oneloop's own verdicts are honoured, with their reset as Retry-After.
    fake.patch("key-a", "status", "RATE_LIMITED".into());
    fake.patch("key-a", "rateLimit", json!({"remaining": 0, "resetAt": millis_from_now(Duration::from_millis(2500))}));
    let req = Request::get("/v1/items").header("x-api-key", "key-a").body(Body::empty()).unwrap();
    let res = s.app.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(res.headers()["retry-after"], "3");
    fake.assert_no_violations();
}

#[tokio::test]
async fn a_flood_of_forged_keys_costs_no_upstream_call_and_no_cache_entry() {
    let (addr, fake) = start().await;
    let format = KeyFormat::checksummed("ol_").unwrap();
    let s = setup(addr, |b| b.cache(CacheConfig::default().max_entries(1000)), |l| l.key_format(format.clone()));
    for i in 0..100_000u32 {
        // Right prefix and length, wrong checksum.
        let key = format!("ol_{:0>28}", i);
        assert_eq!(call(&s.app, "GET", "/v1/items", &key).await.0, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(fake.calls(), 0);
    let cache = s.oneloop.cache().unwrap();
    cache.run_pending_tasks();
    assert_eq!(cache.entry_count(), 0);
    // A well-formed key does reach Oneloop.
    let good = format.generate().unwrap();
    assert_eq!(call(&s.app, "GET", "/v1/items", good.expose_secret()).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(fake.calls(), 1);
}

#[tokio::test]
async fn record_usage_follows_the_spec() {
    let (addr, fake) = start().await;
    let s = setup(addr, |b| b, |l| l);
    let key = keygate::ApiKey::new("key-a");
    s.oneloop.record_usage(&key, 7, Some("tokens")).await.unwrap();
    s.oneloop.record_usage(&key, 3, Some("tokens")).await.unwrap();
    s.oneloop.record_usage(&key, 1, None).await.unwrap();
    let usage = fake.usage.lock().unwrap().clone();
    assert_eq!(usage[&("key-a".to_owned(), Some("tokens".to_owned()))], 10);
    assert_eq!(usage[&("key-a".to_owned(), None)], 1);
    fake.set(Behaviour::Status500);
    let err = s.oneloop.record_usage(&key, 1, None).await.unwrap_err();
    assert!(!err.to_string().contains("key-a"), "{err}");
    fake.assert_no_violations();
}
