//! Odd spellings of a path never get a weaker scope than the plain path, behind axum and behind a
//! lenient plain-hyper service that decodes and case-folds paths itself.

mod common;

use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::Full;
use keygate::{ApiKeyLayer, KeyFacts, LocalVerifier, RouteTable};
use std::convert::Infallible;

const SPELLINGS: [&str; 14] = [
    "/admin;x",
    "/items/..;/admin",
    "/public/..;/admin",
    "/items;x/..;/admin",
    "/admin%3b",
    "/admin/",
    "//admin",
    "/ADMIN",
    "/%61dmin",
    "/public/../admin",
    "/public/%2e%2e/admin",
    "/Admin//",
    "/%2561dmin",
    "/public/..%2fadmin",
];

fn routes() -> RouteTable {
    RouteTable::new().public("/public/{*rest}").route("/admin", "admin").route("/items", "items")
}

async fn keys(verifier: &LocalVerifier) -> (String, String) {
    let weak = verifier.create(KeyFacts::new("weak").with_scopes(["items:*".parse().unwrap()])).await.unwrap();
    let admin = verifier.create(KeyFacts::new("admin").with_scopes(["admin:*".parse().unwrap()])).await.unwrap();
    (weak.key.expose_secret().into(), admin.key.expose_secret().into())
}

#[tokio::test]
async fn behind_axum() {
    let verifier = LocalVerifier::in_memory();
    let (weak, admin) = keys(&verifier).await;
    let layer = ApiKeyLayer::builder(verifier).routes(routes()).build().unwrap();
    let app = Router::new()
        .route("/admin", get(|| async { "ADMIN DATA" }))
        .route("/items", get(|| async { "items" }))
        .route("/public/{*rest}", get(|| async { "public" }))
        .fallback(|| async { (http::StatusCode::NOT_FOUND, "not found") })
        .layer(layer);
    let addr = serve_axum(app).await;
    assert_eq!(fetch(addr, "/admin", &[("x-api-key", admin.as_bytes())]).await.body, "ADMIN DATA");
    assert_eq!(fetch(addr, "/admin", &[("x-api-key", weak.as_bytes())]).await.status, 403);
    for path in SPELLINGS {
        let r = fetch(addr, path, &[("x-api-key", weak.as_bytes())]).await;
        assert!(matches!(r.status.as_u16(), 400 | 403), "{path}: {} {}", r.status, r.body);
        let r = fetch(addr, path, &[]).await;
        assert!(matches!(r.status.as_u16(), 400 | 401), "{path} without a key: {} {}", r.status, r.body);
    }
}

/// What a careless server might do: strip `;` parameters, decode escapes, resolve `..`, fold case
/// and slashes.
fn lenient_route(raw: &str) -> String {
    let decoded = percent_encoding::percent_decode_str(raw).decode_utf8_lossy().to_lowercase();
    let mut out: Vec<&str> = Vec::new();
    for seg in decoded.split('/').map(|s| s.split_once(';').map_or(s, |(before, _)| before)) {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

#[tokio::test]
async fn behind_a_lenient_hyper_service() {
    let verifier = LocalVerifier::in_memory();
    let (weak, admin) = keys(&verifier).await;
    let layer = ApiKeyLayer::builder(verifier).routes(routes()).build().unwrap();
    let inner = tower::service_fn(|req: Request<hyper::body::Incoming>| async move {
        let body = if lenient_route(req.uri().path()) == "/admin" { "ADMIN DATA" } else { "other" };
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
    });
    let addr = serve_hyper(tower::ServiceBuilder::new().layer(layer).service(inner)).await;
    assert_eq!(fetch(addr, "/admin", &[("x-api-key", admin.as_bytes())]).await.body, "ADMIN DATA");
    for path in SPELLINGS {
        let r = fetch(addr, path, &[("x-api-key", weak.as_bytes())]).await;
        assert_ne!(r.body, "ADMIN DATA", "{path} leaked admin data to a weak key");
        assert!(matches!(r.status.as_u16(), 400 | 403), "{path}: {} {}", r.status, r.body);
        // The admin key gets the same answer as on the plain path, or a 400 for an ambiguous one.
        let r = fetch(addr, path, &[("x-api-key", admin.as_bytes())]).await;
        assert!(r.status == 400 || r.body == "ADMIN DATA", "{path}: {} {}", r.status, r.body);
    }
}

/// With matrix parameters allowed, keygate reads each segment without its `;…` as the lenient
/// server does: the admin key reaches `/admin;v=1`, a weak key reaches nothing of admin's.
#[tokio::test]
async fn matrix_parameters_when_allowed_read_as_the_server_reads_them() {
    let verifier = LocalVerifier::in_memory();
    let (weak, admin) = keys(&verifier).await;
    let layer = ApiKeyLayer::builder(verifier).routes(routes().matrix_parameters(true)).build().unwrap();
    let inner = tower::service_fn(|req: Request<hyper::body::Incoming>| async move {
        let body = if lenient_route(req.uri().path()) == "/admin" { "ADMIN DATA" } else { "other" };
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
    });
    let addr = serve_hyper(tower::ServiceBuilder::new().layer(layer).service(inner)).await;
    assert_eq!(fetch(addr, "/admin;v=1", &[("x-api-key", admin.as_bytes())]).await.body, "ADMIN DATA");
    for path in SPELLINGS.iter().chain(&["/items;v=2/..;/admin", "/Admin;x=1/"]) {
        let r = fetch(addr, path, &[("x-api-key", weak.as_bytes())]).await;
        assert_ne!(r.body, "ADMIN DATA", "{path} leaked admin data to a weak key");
    }
}
