//! What handlers see: the `VerifiedKey` extractor, optional mode, per-route `require`, CORS
//! preflights, and key management taking effect on the next request.
#![cfg(feature = "axum")]

mod common;

use axum::routing::{get, post};
use axum::{Json, Router};
use common::*;
use keygate::{require, require_scope, Action, ApiKeyLayer, KeyFacts, LocalVerifier, RouteTable, VerifiedKey};
use serde_json::{json, Value};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

async fn facts(key: VerifiedKey) -> Json<Value> {
    Json(json!({
        "id": key.id(),
        "name": key.name(),
        "scopes": key.scopes().iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        "metadata": key.metadata(),
        "customer": key.customer_id(),
        "expires": key.expires_at().map(|t| t.duration_since(UNIX_EPOCH).unwrap().as_secs()),
    }))
}

#[tokio::test]
async fn the_extractor_sees_the_facts_and_never_the_key() {
    let verifier = LocalVerifier::in_memory();
    let expiry = UNIX_EPOCH + Duration::from_secs(4_000_000_000);
    let created = verifier
        .create(
            KeyFacts::new("key_7")
                .with_name("ci")
                .with_scopes(["items:read".parse().unwrap()])
                .with_metadata("plan", "pro")
                .with_customer("cus_1")
                .with_expiry(expiry),
        )
        .await
        .unwrap();
    let key = created.key.expose_secret();
    let app = Router::new().route("/me", get(facts)).layer(ApiKeyLayer::new(verifier));
    let addr = serve_axum(app).await;
    let r = fetch(addr, "/me", &[("x-api-key", key.as_bytes())]).await;
    assert_eq!(
        r.json(),
        json!({"id": "key_7", "name": "ci", "scopes": ["items:read"], "metadata": {"plan": "pro"}, "customer": "cus_1", "expires": 4_000_000_000u64})
    );
    assert!(!r.body.contains(key));
}

#[tokio::test]
async fn optional_mode_lets_keyless_requests_through_but_not_bad_keys() {
    let verifier = LocalVerifier::in_memory();
    let key = verifier.create(KeyFacts::new("k")).await.unwrap().key;
    let layer = ApiKeyLayer::builder(verifier).optional(true).build().unwrap();
    let app = Router::new()
        .route("/hello", get(|k: Option<VerifiedKey>| async move { k.map_or("guest".into(), |k| k.id().to_owned()) }))
        .route("/strict", get(|k: VerifiedKey| async move { k.id().to_owned() }))
        .layer(layer);
    let addr = serve_axum(app).await;
    assert_eq!(fetch(addr, "/hello", &[]).await.body, "guest");
    assert_eq!(fetch(addr, "/hello", &[("x-api-key", key.expose_secret().as_bytes())]).await.body, "k");
    assert_eq!(fetch(addr, "/hello", &[("x-api-key", b"bad-key")]).await.status, 401);
    // A handler that needs a key refuses a keyless request itself.
    let r = fetch(addr, "/strict", &[]).await;
    assert_eq!((r.status.as_u16(), r.json()["type"].as_str()), (401, Some("urn:keygate:problem:missing-key")));
}

#[tokio::test]
async fn per_route_annotations() {
    let verifier = LocalVerifier::in_memory();
    let reader = verifier.create(KeyFacts::new("r").with_scopes(["reports:read".parse().unwrap()])).await.unwrap().key;
    let app = Router::new()
        .route("/reports", get(|| async { "list" }).post(|| async { "made" }).route_layer(require("reports")))
        .route("/reports/export", post(|| async { "exported" }).route_layer(require_scope("reports", Action::Read)))
        .layer(ApiKeyLayer::new(verifier));
    let addr = serve_axum(app).await;
    let h = [("x-api-key", reader.expose_secret().as_bytes())];
    assert_eq!(fetch(addr, "/reports", &h).await.body, "list");
    let r = request(addr, "POST", "/reports", &h).await;
    assert_eq!((r.status.as_u16(), r.json()["required_scope"].as_str()), (403, Some("reports:create")));
    assert_eq!(request(addr, "POST", "/reports/export", &h).await.body, "exported");

    // Without a gate in front, an annotation fails closed: a wiring error (500), not a 401 asking
    // for the key the caller sent.
    let bare = serve_axum(Router::new().route("/r", get(|| async { "x" }).route_layer(require("reports")))).await;
    assert_eq!(fetch(bare, "/r", &h).await.status, 500);
}

#[tokio::test]
async fn route_layer_uses_matched_templates_and_leaves_404s_alone() {
    let verifier = LocalVerifier::in_memory();
    let key = verifier.create(KeyFacts::new("k").with_scopes(["items:read".parse().unwrap()])).await.unwrap().key;
    let layer = ApiKeyLayer::builder(verifier).routes(RouteTable::new().route("/items/{id}", "items")).build().unwrap();
    let app = Router::new().route("/items/{id}", get(|| async { "item" })).route_layer(layer);
    let addr = serve_axum(app).await;
    let h = [("x-api-key", key.expose_secret().as_bytes())];
    assert_eq!(fetch(addr, "/items/ABC", &h).await.body, "item");
    assert_eq!(request(addr, "DELETE", "/items/1", &h).await.status, 403);
    // route_layer gates matched routes only: an unknown path is axum's 404, key or not.
    assert_eq!(fetch(addr, "/nowhere", &[]).await.status, 404);
}

#[tokio::test]
async fn preflights_pass_only_when_enabled() {
    for (allow, expected) in [(false, 401), (true, 200)] {
        let layer = ApiKeyLayer::builder(LocalVerifier::in_memory()).allow_preflight(allow).build().unwrap();
        let app = Router::new().route("/x", get(|| async { "x" }).options(|| async { "preflight" })).layer(layer);
        let addr = serve_axum(app).await;
        let r = request(
            addr,
            "OPTIONS",
            "/x",
            &[("origin", b"https://a.example"), ("access-control-request-method", b"GET")],
        )
        .await;
        assert_eq!(r.status.as_u16(), expected, "allow_preflight({allow})");
        // A plain OPTIONS is not a preflight, and neither is one without an Origin: browsers always
        // send one with a preflight.
        assert_eq!(request(addr, "OPTIONS", "/x", &[]).await.status, 401);
        let no_origin = request(addr, "OPTIONS", "/x", &[("access-control-request-method", b"GET")]).await;
        assert_eq!(no_origin.status, 401, "allow_preflight({allow}): no Origin, no preflight");
    }
}

#[tokio::test]
async fn key_management_takes_effect_on_the_next_request() {
    let verifier = LocalVerifier::in_memory();
    let key = verifier.create(KeyFacts::new("k")).await.unwrap().key;
    let addr =
        serve_axum(Router::new().route("/x", get(|| async { "ok" })).layer(ApiKeyLayer::new(verifier.clone()))).await;
    let ask = |k: &keygate::ApiKey| {
        let v = k.expose_secret().to_owned();
        async move { fetch(addr, "/x", &[("x-api-key", v.as_bytes())]).await.status.as_u16() }
    };
    assert_eq!(ask(&key).await, 200);
    verifier.disable("k").await.unwrap();
    assert_eq!(ask(&key).await, 401);
    verifier.enable("k").await.unwrap();
    assert_eq!(ask(&key).await, 200);
    let rotated = verifier.rotate("k", std::time::Duration::ZERO).await.unwrap();
    assert_eq!((ask(&key).await, ask(&rotated).await), (401, 200));
    verifier.delete("k").await.unwrap();
    assert_eq!(ask(&rotated).await, 401);
    assert!(verifier.disable("nobody").await.is_err());
    assert!(verifier.create(KeyFacts::new("k")).await.is_err(), "ids are unique");
}

#[tokio::test]
async fn keys_load_from_a_file() {
    let dir = std::env::temp_dir().join(format!("keygate-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("keys.toml");
    let later = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 3600;
    std::fs::write(
        &path,
        format!(
            "[[keys]]\nid = \"dev\"\nkey = \"dev-key-123\"\nscopes = [\"items:read\"]\nexpires_at = {later}\n\n\
             [[keys]]\nid = \"prod\"\ndigest = \"{}\"\nscopes = [\"items:*\"]\ncustomer_id = \"cus_9\"\n\n\
             [[keys]]\nid = \"off\"\nkey = \"off-key-123\"\nenabled = false\n",
            keygate::KeyDigest::of("prod-key-456")
        ),
    )
    .unwrap();
    let verifier = LocalVerifier::from_key_file(&path).unwrap();
    let layer = ApiKeyLayer::builder(verifier).routes(RouteTable::new().route("/items", "items")).build().unwrap();
    let addr = serve_axum(Router::new().route("/items", get(facts).post(facts)).layer(layer)).await;
    assert_eq!(fetch(addr, "/items", &[("x-api-key", b"dev-key-123")]).await.json()["id"], "dev");
    assert_eq!(request(addr, "POST", "/items", &[("x-api-key", b"dev-key-123")]).await.status, 403);
    assert_eq!(request(addr, "POST", "/items", &[("x-api-key", b"prod-key-456")]).await.json()["customer"], "cus_9");
    assert_eq!(fetch(addr, "/items", &[("x-api-key", b"off-key-123")]).await.status, 401);
    std::fs::remove_dir_all(dir).unwrap();
}

/// One responder for every refusal keygate makes: the layer's, the route's `require(...)` and the
/// extractor's.
#[tokio::test]
async fn the_custom_responder_answers_every_refusal() {
    let teapot = |r: &keygate::Rejection| {
        let mut res = http::Response::new(bytes::Bytes::from(format!("teapot: {}", r.status().as_u16())));
        *res.status_mut() = http::StatusCode::IM_A_TEAPOT;
        res
    };
    let verifier = LocalVerifier::in_memory();
    let items = verifier.create(KeyFacts::new("k").with_scopes(["items:*".parse().unwrap()])).await.unwrap().key;
    let layer = ApiKeyLayer::builder(verifier).optional(true).responder(teapot).build().unwrap();
    let app = Router::new()
        .route("/admin", get(|| async { "admin" }).route_layer(require("admin")))
        .route("/me", get(|k: VerifiedKey| async move { k.id().to_owned() }))
        .layer(layer);
    let addr = serve_axum(app).await;
    let r = fetch(addr, "/admin", &[("x-api-key", items.expose_secret().as_bytes())]).await;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (418, "teapot: 403"), "require(...) refusing a scope");
    let r = fetch(addr, "/admin", &[]).await;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (418, "teapot: 401"), "require(...) with no key");
    let r = fetch(addr, "/me", &[]).await;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (418, "teapot: 401"), "the extractor with no key");
    let r = fetch(addr, "/me", &[("x-api-key", b"nope")]).await;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (418, "teapot: 401"), "the layer itself");
}

/// A handler asking for a `VerifiedKey` on a route the layer does not cover is a wiring error: 500,
/// as axum answers a missing extension, not a 401 asking for a key the caller already sent.
#[tokio::test]
async fn a_key_asked_for_where_no_gate_runs_is_a_500() {
    let verifier = LocalVerifier::in_memory();
    let key = verifier.create(KeyFacts::new("k")).await.unwrap().key;
    let app = Router::new()
        .route("/gated", get(|k: VerifiedKey| async move { k.id().to_owned() }))
        .route_layer(ApiKeyLayer::new(verifier))
        .route("/forgotten", get(|k: VerifiedKey| async move { k.id().to_owned() }))
        .route("/forgotten-require", get(|| async { "x" }).route_layer(require("x")));
    let addr = serve_axum(app).await;
    let sent = [("x-api-key", key.expose_secret().as_bytes())];
    assert_eq!(fetch(addr, "/gated", &sent).await.body, "k");
    assert_eq!(fetch(addr, "/forgotten", &sent).await.status, 500);
    assert_eq!(fetch(addr, "/forgotten-require", &sent).await.status, 500);
}
