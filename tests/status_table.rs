//! Every row of the README's status table, over real HTTP, behind axum and behind plain hyper.
#![cfg(feature = "axum")]

mod common;
#[allow(dead_code)] // the test uses the table, not the demo's handlers
#[path = "../examples/demo_api/mod.rs"]
mod demo_api;

use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use keygate::{
    ApiKeyLayer, KeyFacts, KeyStatus, LocalVerifier, RouteTable, Scope, Verification, VerifiedKey, Verifier,
};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// The quickstart's own route table.
fn routes() -> RouteTable {
    demo_api::routes()
}

fn layer(verifier: impl Verifier) -> ApiKeyLayer {
    ApiKeyLayer::builder(verifier).routes(routes()).build().unwrap()
}

async fn whoami(key: Option<VerifiedKey>) -> String {
    key.map_or("anonymous".into(), |k| k.id().to_owned())
}

async fn axum_app(layer: ApiKeyLayer) -> SocketAddr {
    let app = Router::new()
        .route("/health", get(whoami))
        .route("/v1/items", get(whoami).post(whoami))
        .route("/v1/items/{id}", get(whoami).put(whoami).delete(whoami))
        .route("/v1/admin/stats", get(whoami))
        .route("/v1/unmapped", get(whoami))
        .layer(layer);
    serve_axum(app).await
}

/// A hyper service with no router at all: it answers every path, so only the gate decides.
async fn hyper_app(layer: ApiKeyLayer) -> SocketAddr {
    let inner = tower::service_fn(|req: Request<hyper::body::Incoming>| async move {
        let who = req.extensions().get::<VerifiedKey>().map_or("anonymous".into(), |k| k.id().to_owned());
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(who))))
    });
    serve_hyper(tower::ServiceBuilder::new().layer(layer).service(inner)).await
}

struct Keys {
    reader: String,
    admin: String,
    expired: String,
    disabled: String,
    deleted: String,
}

async fn keys(verifier: &LocalVerifier) -> Keys {
    let scopes = |s: &[&str]| s.iter().map(|s| s.parse::<Scope>().unwrap()).collect::<Vec<_>>();
    let mk = |id: &str, s: &[&str]| KeyFacts::new(id).with_scopes(scopes(s));
    let reader = verifier.create(mk("reader", &["items:read"])).await.unwrap();
    let admin = verifier.create(mk("admin", &["items:*", "admin:read"])).await.unwrap();
    let past = SystemTime::now() - Duration::from_secs(1);
    let expired = verifier.create(mk("expired", &["items:*"]).with_expiry(past)).await.unwrap();
    let disabled = verifier.create(mk("disabled", &["items:*"])).await.unwrap();
    let deleted = verifier.create(mk("deleted", &["items:*"])).await.unwrap();
    verifier.disable("disabled").await.unwrap();
    verifier.delete("deleted").await.unwrap();
    let s = |k: keygate::CreatedKey| k.key.expose_secret().to_owned();
    Keys { reader: s(reader), admin: s(admin), expired: s(expired), disabled: s(disabled), deleted: s(deleted) }
}

fn problem(reply: &Reply, status: u16, kind: &str) {
    assert_eq!(reply.status.as_u16(), status, "{}", reply.body);
    assert_eq!(reply.header("content-type"), Some("application/problem+json"));
    let json = reply.json();
    assert_eq!(json["type"], format!("urn:keygate:problem:{kind}"));
    assert_eq!(json["status"], status);
}

async fn local_rows(addr: SocketAddr, keys: &Keys) {
    let b = |k: &str| bearer(k);
    let h = |p: &(&'static str, Vec<u8>)| [(p.0, p.1.clone())];
    let get_with = |path: &'static str, hdr: Vec<(&'static str, Vec<u8>)>| async move {
        let refs: Vec<(&str, &[u8])> = hdr.iter().map(|(n, v)| (*n, v.as_slice())).collect();
        fetch(addr, path, &refs).await
    };

    // 200: a valid key with the scope; the handler sees the key id.
    let ok = get_with("/v1/items", h(&b(&keys.reader)).to_vec()).await;
    assert_eq!((ok.status, ok.body.as_str()), (StatusCode::OK, "reader"));
    // 200: a public route needs no key.
    let public = fetch(addr, "/health", &[]).await;
    assert_eq!((public.status, public.body.as_str()), (StatusCode::OK, "anonymous"));

    // 401: no key.
    let missing = fetch(addr, "/v1/items", &[]).await;
    problem(&missing, 401, "missing-key");
    assert_eq!(missing.header("www-authenticate"), Some("Bearer"));

    // 401: unknown, expired, disabled, deleted keys share one body.
    let mut bodies = Vec::new();
    for key in ["kg_unknownkey", &keys.expired, &keys.disabled, &keys.deleted] {
        let r = get_with("/v1/items", h(&b(key)).to_vec()).await;
        problem(&r, 401, "invalid-key");
        assert_eq!(r.header("www-authenticate"), Some("Bearer error=\"invalid_token\""));
        bodies.push(r.body);
    }
    assert!(bodies.windows(2).all(|w| w[0] == w[1]), "{bodies:?}");

    // 401: malformed (too long).
    let long = get_with("/v1/items", vec![("x-api-key", vec![b'k'; 257])]).await;
    problem(&long, 401, "malformed-key");

    // 400: two keys.
    let two = get_with("/v1/items", vec![b(&keys.reader), ("x-api-key", keys.reader.clone().into_bytes())]).await;
    problem(&two, 400, "ambiguous-key");
    assert_eq!(two.header("www-authenticate"), Some("Bearer error=\"invalid_request\""));

    // 400: an ambiguous path.
    problem(&get_with("/v1/%2e%2e/v1/admin/stats", h(&b(&keys.reader)).to_vec()).await, 400, "invalid-path");

    // 403: the key lacks the scope; the body and the challenge name it.
    let scope =
        request(addr, "POST", "/v1/items", &[("authorization", format!("Bearer {}", keys.reader).as_bytes())]).await;
    problem(&scope, 403, "insufficient-scope");
    assert_eq!(scope.json()["required_scope"], "items:create");
    assert_eq!(scope.header("www-authenticate"), Some("Bearer error=\"insufficient_scope\", scope=\"items:create\""));
    problem(&get_with("/v1/admin/stats", h(&b(&keys.reader)).to_vec()).await, 403, "insufficient-scope");
    let admin = get_with("/v1/admin/stats", h(&b(&keys.admin)).to_vec()).await;
    assert_eq!((admin.status, admin.body.as_str()), (StatusCode::OK, "admin"));

    // 403: strict mode refuses routes nobody mapped, even to the strongest key.
    problem(&get_with("/v1/unmapped", h(&b(&keys.admin)).to_vec()).await, 403, "unmapped-route");
}

#[tokio::test]
async fn local_verifier_rows_behind_axum_and_hyper() {
    let verifier = LocalVerifier::in_memory();
    let keys = keys(&verifier).await;
    local_rows(axum_app(layer(verifier.clone())).await, &keys).await;
    local_rows(hyper_app(layer(verifier.clone())).await, &keys).await;
    // The same rows when the verifier answers asynchronously (the remote path).
    local_rows(axum_app(layer(Counting::async_only(verifier.clone()))).await, &keys).await;
    local_rows(hyper_app(layer(Counting::async_only(verifier))).await, &keys).await;
}

#[tokio::test]
async fn limits_and_outages() {
    let facts = Arc::new(KeyFacts::new("k").with_scopes(["items:*".parse().unwrap()]));
    for addr in [
        axum_app(layer(Fixed(Verification::new(KeyStatus::RateLimited, facts.clone())))).await,
        hyper_app(layer(Fixed(Verification::new(KeyStatus::RateLimited, facts.clone())))).await,
    ] {
        let r = fetch(addr, "/v1/items", &[("x-api-key", b"some-key")]).await;
        problem(&r, 429, "rate-limited");
        assert!(r.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);
    }
    let usage = axum_app(layer(Fixed(Verification::new(KeyStatus::UsageLimited, facts)))).await;
    problem(&fetch(usage, "/v1/items", &[("x-api-key", b"some-key")]).await, 429, "usage-limited");

    for addr in [axum_app(layer(Unreachable)).await, hyper_app(layer(Unreachable)).await] {
        let r = fetch(addr, "/v1/items", &[("x-api-key", b"some-key")]).await;
        problem(&r, 503, "unavailable");
        assert_eq!(r.header("retry-after"), Some("1"));
        // A public route does not depend on the verifier.
        assert_eq!(fetch(addr, "/health", &[]).await.status, StatusCode::OK);
    }
}

#[tokio::test]
async fn a_custom_responder_replaces_the_body() {
    let layer = ApiKeyLayer::builder(LocalVerifier::in_memory())
        .responder(|r: &keygate::Rejection| {
            let mut res = Response::new(Bytes::from(format!("denied: {}", r.status().as_u16())));
            *res.status_mut() = r.status();
            res
        })
        .build()
        .unwrap();
    let r = fetch(axum_app(layer).await, "/v1/items", &[]).await;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (401, "denied: 401"));
}
