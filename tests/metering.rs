//! Usage metering to Oneloop's record-usage, against the loopback Oneloop.
#![cfg(all(feature = "oneloop", feature = "axum"))]

mod common;

use axum::body::Body;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use common::oneloop::{answer, start, Behaviour, Fake, TOKEN};
use http::{Request, StatusCode};
use http_body::Frame;
use keygate::oneloop::OneloopVerifier;
use keygate::oneloop::{BatchConfig, UsageBatcher};
use keygate::usage::UsageHandle;
use keygate::{ApiKeyLayer, RoutePolicy, RouteTable, VerifiedKey};
use serde_json::json;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;
use tower::ServiceExt;

/// A streamed body that reports its usage only once it has been produced in full.
struct Metered {
    chunks: Vec<&'static str>,
    usage: UsageHandle,
}

impl http_body::Body for Metered {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.chunks.is_empty() {
            return Poll::Ready(None);
        }
        let chunk = self.chunks.remove(0);
        if self.chunks.is_empty() {
            // The last token is out: now the count is known.
            self.usage.add("tokens", 42);
        }
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(chunk.as_bytes())))))
    }
}

async fn stream(key: VerifiedKey) -> Body {
    Body::new(Metered { chunks: vec!["forty", "-", "two"], usage: key.usage().clone() })
}

struct Setup {
    app: Router,
    batcher: UsageBatcher,
}

fn setup(addr: SocketAddr, config: BatchConfig) -> Setup {
    let oneloop = OneloopVerifier::builder(TOKEN).base_url(format!("http://{addr}")).build().unwrap();
    let batcher = UsageBatcher::new(oneloop.clone(), config);
    let routes = RouteTable::new()
        .route_with("/gen", "items", RoutePolicy::new().usage(1, Some("requests")))
        .route("/stream", "items");
    let layer = ApiKeyLayer::builder(oneloop).routes(routes).usage_sink(batcher.clone()).build().unwrap();
    let app = Router::new()
        .route("/gen", get(|| async { "ok" }).post(|| async { "ok" }))
        .route("/stream", get(stream))
        .layer(layer);
    Setup { app, batcher }
}

async fn call(app: &Router, method: &str, path: &str, key: &str) -> (StatusCode, Bytes) {
    let req = Request::builder().method(method).uri(path).header("x-api-key", key).body(Body::empty()).unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    (res.status(), axum::body::to_bytes(res.into_body(), 1 << 20).await.unwrap())
}

fn used(fake: &Fake, key: &str, name: &str) -> u128 {
    fake.usage.lock().unwrap().get(&(key.to_owned(), Some(name.to_owned()))).copied().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_requests_make_a_handful_of_calls_summing_exactly() {
    let (addr, fake) = start().await;
    fake.add("key-a", answer("key_a", &["items:*"]));
    let s = setup(addr, BatchConfig::default().interval(Duration::from_millis(200)));
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let app = s.app.clone();
            tokio::spawn(async move {
                for _ in 0..2_500 {
                    assert_eq!(call(&app, "GET", "/gen", "key-a").await.0, StatusCode::OK);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(s.batcher.shutdown(Duration::from_secs(5)).await.unsent, 0);
    assert_eq!(used(&fake, "key-a", "requests"), 10_000);
    let calls = fake.usage_calls.load(Ordering::SeqCst);
    assert!((1..=60).contains(&calls), "{calls} record-usage calls");
    assert_eq!(s.batcher.sent(), 10_000);
    fake.assert_no_violations();
}

#[tokio::test]
async fn an_outage_loses_nothing_and_rejected_requests_add_nothing() {
    let (addr, fake) = start().await;
    fake.add("key-a", answer("key_a", &["items:read"]));
    let s =
        setup(addr, BatchConfig::default().interval(Duration::from_millis(50)).max_backoff(Duration::from_millis(200)));
    assert_eq!(call(&s.app, "GET", "/gen", "key-a").await.0, StatusCode::OK); // warm the verify cache
                                                                              // `503`: Oneloop says it took nothing, so the batcher keeps it and retries (a `500` could come
                                                                              // after recording, and is not retried: tests/metering_faults.rs).
    fake.set(Behaviour::Status503);
    for _ in 0..999 {
        assert_eq!(call(&s.app, "GET", "/gen", "key-a").await.0, StatusCode::OK);
    }
    // Refused: no `create` scope, and an unknown key. Neither is charged.
    for _ in 0..50 {
        assert_eq!(call(&s.app, "POST", "/gen", "key-a").await.0, StatusCode::FORBIDDEN);
    }
    tokio::time::sleep(Duration::from_millis(400)).await; // several failed flushes
    assert_eq!(used(&fake, "key-a", "requests"), 0);
    fake.set(Behaviour::Normal);
    assert_eq!(s.batcher.shutdown(Duration::from_secs(5)).await.unsent, 0);
    assert_eq!(used(&fake, "key-a", "requests"), 1_000);
    assert_eq!(s.batcher.overflowed(), 0);
}

#[tokio::test]
async fn the_buffer_is_bounded_and_its_overflow_counted() {
    let (addr, fake) = start().await;
    for i in 0..10 {
        fake.add(&format!("key-{i}"), answer(&format!("id_{i}"), &["items:*"]));
    }
    let s = setup(addr, BatchConfig::default().max_buffered(4).interval(Duration::from_secs(3600)));
    for i in 0..10 {
        for _ in 0..3 {
            assert_eq!(call(&s.app, "GET", "/gen", &format!("key-{i}")).await.0, StatusCode::OK);
        }
    }
    assert_eq!(s.batcher.pending(), 4);
    assert_eq!(s.batcher.overflowed(), 18, "6 keys x 3 requests found the buffer full");
    assert_eq!(s.batcher.shutdown(Duration::from_secs(5)).await.unsent, 0);
    let total: u128 = fake.usage.lock().unwrap().values().sum();
    assert_eq!(total + s.batcher.overflowed() as u128, 30);
}

#[tokio::test]
async fn usage_added_after_the_body_is_produced_is_metered() {
    let (addr, fake) = start().await;
    fake.add("key-a", answer("key_a", &["items:*"]));
    let s = setup(addr, BatchConfig::default());
    let (status, body) = call(&s.app, "GET", "/stream", "key-a").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"forty-two"[..]));
    assert_eq!(s.batcher.shutdown(Duration::from_secs(5)).await.unsent, 0);
    assert_eq!(used(&fake, "key-a", "tokens"), 42);
}

#[tokio::test]
async fn oneloops_billing_meter_is_the_allowance() {
    let (addr, fake) = start().await;
    let mut a = answer("key_b", &["items:*"]);
    a["billing"] = json!({"id": "m1", "totalCredits": "5", "usedCredits": "3", "allowOverages": false,
                          "spendCap": null, "createdAt": "2026-01-01", "updatedAt": "2026-01-01"});
    fake.add("key-b", a);
    let oneloop = OneloopVerifier::builder(TOKEN).base_url(format!("http://{addr}")).build().unwrap();
    let routes = RouteTable::new().route_with("/gen", "items", RoutePolicy::new().usage(1, None));
    let layer = ApiKeyLayer::builder(oneloop.clone()).routes(routes).build().unwrap();
    let app = Router::new().route("/gen", get(|| async { "ok" })).layer(layer);
    assert_eq!(call(&app, "GET", "/gen", "key-b").await.0, StatusCode::OK);
    assert_eq!(call(&app, "GET", "/gen", "key-b").await.0, StatusCode::OK);
    let (status, body) = call(&app, "GET", "/gen", "key-b").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(String::from_utf8_lossy(&body).contains("usage-limited"));
    // Oneloop now counts our 2 and the customer bought 10 more: the local count converges on it.
    fake.patch(
        "key-b",
        "billing",
        json!({"id": "m1", "totalCredits": "15", "usedCredits": "5",
        "allowOverages": false, "spendCap": null, "createdAt": "2026-01-01", "updatedAt": "2026-01-02"}),
    );
    oneloop.invalidate("key-b");
    let mut passed = 0;
    for _ in 0..20 {
        passed += u32::from(call(&app, "GET", "/gen", "key-b").await.0 == StatusCode::OK);
    }
    assert_eq!(passed, 10);
}

/// Per-request mode: Oneloop's verify bills the route's usage and counts the route's rate limit,
/// so the layer counts neither again: 12 requests bill 12 units once (not once in verify and again
/// through record-usage), and the limit is Oneloop's window, not a second local one.
#[tokio::test]
async fn per_request_mode_counts_usage_and_the_route_limit_once() {
    let (addr, fake) = start().await;
    fake.add("key-a", answer("key_a", &["items:*"]));
    let oneloop = OneloopVerifier::builder(TOKEN)
        .base_url(format!("http://{addr}"))
        .mode(keygate::oneloop::Mode::PerRequest)
        .build()
        .unwrap();
    let batcher = UsageBatcher::new(oneloop.clone(), BatchConfig::default().interval(Duration::from_millis(20)));
    let limit = keygate::limit::RateLimit::per_minute("rl", 3).unwrap();
    let routes = RouteTable::new()
        .route_with("/gen", "items", RoutePolicy::new().usage(1, Some("requests")).rate_limit(limit))
        .route_with("/free", "items", RoutePolicy::new().usage(1, Some("requests")));
    let layer = ApiKeyLayer::builder(oneloop).routes(routes).usage_sink(batcher.clone()).build().unwrap();
    let app = Router::new().route("/gen", get(|| async { "ok" })).route("/free", get(|| async { "ok" })).layer(layer);
    for _ in 0..12 {
        assert_eq!(call(&app, "GET", "/free", "key-a").await.0, StatusCode::OK);
    }
    assert_eq!(batcher.shutdown(Duration::from_secs(5)).await.recorded, 0, "nothing for record-usage");
    assert_eq!(used(&fake, "key-a", "requests"), 12, "billed once, by verify");

    let mut passed = 0;
    for _ in 0..6 {
        passed += u32::from(call(&app, "GET", "/gen", "key-a").await.0 == StatusCode::OK);
    }
    assert_eq!(passed, 3, "Oneloop's limit of 3");
    // Oneloop's window ends: its limit is the only one, so the key passes again at once.
    fake.end_rate_windows();
    let req = Request::get("/gen").header("x-api-key", "key-a").body(Body::empty()).unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK, "no second, local window of the same limit");
    assert_eq!(res.headers()["ratelimit"], "\"rl\";r=2;t=60", "the headers show Oneloop's count");
    assert_eq!(used(&fake, "key-a", "requests"), 12 + 4);
    fake.assert_no_violations();
}
