//! What keygate accepts from Oneloop's verify: every answer the spec allows (generated, as a mock
//! server of the spec would), and odd answers as failures of one call, never of the service.
#![cfg(feature = "oneloop")]

mod common;

use axum::body::Body;
use axum::routing::get;
use axum::Router;
use common::oneloop::{answer, start, Fake, TOKEN};
use http::{Request, StatusCode};
use keygate::oneloop::OneloopVerifier;
use keygate::{ApiKeyLayer, RouteTable};
use proptest::prelude::*;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tower::ServiceExt;

fn gate(addr: SocketAddr) -> (Router, OneloopVerifier) {
    let oneloop = OneloopVerifier::builder(TOKEN).base_url(format!("http://{addr}")).build().unwrap();
    let layer =
        ApiKeyLayer::builder(oneloop.clone()).routes(RouteTable::new().route("/v1/items", "items")).build().unwrap();
    (Router::new().route("/v1/items", get(|| async { "ok" })).layer(layer), oneloop)
}

async fn call(app: &Router, key: &str) -> StatusCode {
    let req = Request::get("/v1/items").header("x-api-key", key).body(Body::empty()).unwrap();
    app.clone().oneshot(req).await.unwrap().status()
}

fn scope() -> impl Strategy<Value = Value> {
    ("[a-z]{1,8}", any::<[bool; 4]>(), prop::option::of("[a-z0-9]{0,6}")).prop_map(|(rep, [c, r, u, d], id)| {
        let mut s = json!({"representation": rep, "create": c, "read": r, "update": u, "del": d});
        if let Some(id) = id {
            s["id"] = id.into();
        }
        s
    })
}

fn digits() -> impl Strategy<Value = String> {
    // The spec's pattern reads `^d+$`, a typo for `^\d+$`: amounts are strings of digits.
    "[0-9]{1,38}"
}

/// A `VerifyApiKeyResponse` the spec allows, with a non-empty `apiKeyId` on a `VALID` answer.
fn spec_valid_answer() -> impl Strategy<Value = Value> {
    let statuses =
        ["VALID", "EXPIRED", "DISABLED", "DELETED", "RATE_LIMITED", "USAGE_LIMITED", "INVALID_SCOPES", "INVALID"];
    let meter = (any::<bool>(), digits(), digits(), prop::option::of(digits()), "[a-z0-9]{0,8}").prop_map(
        |(overages, total, used, cap, id)| {
            json!({"id": id, "totalCredits": total, "usedCredits": used, "allowOverages": overages,
                   "spendCap": cap, "createdAt": "2026-01-01T00:00:00Z", "updatedAt": ""})
        },
    );
    (
        prop::sample::select(statuses.to_vec()),
        "[a-z0-9_]{1,12}",
        prop::option::of(1i64..i64::MAX),
        prop::collection::vec(scope(), 0..4),
        prop::option::of((any::<i64>(), any::<i64>())),
        prop::option::of(prop::collection::btree_map("[a-z]{1,6}", ".{0,8}", 0..4)),
        prop::option::of(meter),
        prop::option::of(".{0,8}"),
        prop::option::of(".{0,8}"),
    )
        .prop_map(|(status, id, expires, scopes, rate, metadata, billing, meter_id, customer)| {
            let mut a = json!({
                "apiKeyId": id, "expiresAt": expires, "requestedScopes": [], "status": status,
                "billing": billing, "externalMeterId": meter_id, "customerId": customer, "scopes": scopes,
            });
            if let Some((remaining, reset_at)) = rate {
                a["rateLimit"] = json!({"remaining": remaining, "resetAt": reset_at});
            }
            if let Some(metadata) = metadata {
                a["metadata"] = json!(metadata);
            }
            a
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// No spec-valid answer is a 503: keygate decides on it (200, 401, 403, 429).
    #[test]
    fn every_spec_valid_answer_is_decided(answers in prop::collection::vec(spec_valid_answer(), 1..4)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (addr, fake) = start().await;
            let (app, _) = gate(addr);
            for (i, a) in answers.iter().enumerate() {
                let key = format!("key-{i}");
                fake.add(&key, a.clone());
                let status = call(&app, &key).await;
                prop_assert!(matches!(status.as_u16(), 200 | 401 | 403 | 429), "{} for {}", status, a);
            }
            fake.assert_no_violations();
            Ok(())
        })?;
    }
}

/// A past `resetAt`, even a negative one, is "now"; a negative `remaining` is 0.
#[tokio::test]
async fn a_past_or_negative_reset_is_now() {
    let (addr, fake) = start().await;
    let (app, _) = gate(addr);
    for (i, reset_at) in [-1i64, -1_700_000_000_000, 0, 1].into_iter().enumerate() {
        let mut a = answer("key_a", &["items:read"]);
        a["rateLimit"] = json!({"remaining": -3, "resetAt": reset_at});
        fake.add(&format!("k{i}"), a);
        assert_eq!(call(&app, &format!("k{i}")).await, StatusCode::OK, "resetAt {reset_at}");
    }
}

/// A refusal needs no facts: an `EXPIRED` answer with an empty `apiKeyId` is a 401, not a 503. A
/// `VALID` one without an id is refused (the id keys the limits): 503 for that request only.
#[tokio::test]
async fn an_empty_id_is_fine_on_a_refusal_and_refused_on_a_pass() {
    let (addr, fake) = start().await;
    let (app, _) = gate(addr);
    let mut a = answer("", &["items:read"]);
    a["status"] = "EXPIRED".into();
    fake.add("expired", a);
    assert_eq!(call(&app, "expired").await, StatusCode::UNAUTHORIZED);
    fake.add("nameless", answer("", &["items:read"]));
    assert_eq!(call(&app, "nameless").await, StatusCode::SERVICE_UNAVAILABLE);
}

/// Malformed answers for one odd key fail those calls (503) and never open the circuit: other
/// keys keep being verified.
#[tokio::test]
async fn one_odd_key_does_not_take_the_service_down() {
    let (addr, fake) = start().await;
    let (app, oneloop) = gate(addr);
    let odd: Arc<Fake> = fake.clone();
    odd.raw.lock().unwrap().insert("odd".into(), r#"{"apiKeyId": 5, "status": ["VALID"]}"#.into());
    for _ in 0..20 {
        assert_eq!(call(&app, "odd").await, StatusCode::SERVICE_UNAVAILABLE);
    }
    assert!(!oneloop.circuit_open(), "twenty bad answers for one key are not an outage");
    fake.add("good", answer("key_good", &["items:read"]));
    assert_eq!(call(&app, "good").await, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(1)).await;
}
