//! A small API gated by keygate's embedded local verifier.
//!
//! ```sh
//! cargo run --example quickstart                          # demo keys, printed at start
//! KEYGATE_KEYS=keys.toml cargo run --example quickstart   # keys from a file
//! PORT=8080 cargo run --example quickstart
//! ```
//!
//! Then: `curl -H "Authorization: Bearer <key>" http://127.0.0.1:3000/v1/items`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use keygate::{ApiKeyLayer, KeyFacts, KeyFormat, LocalVerifier, Scope, ScopeMap, Unmapped, VerifiedKey};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

type Items = Arc<Mutex<BTreeMap<u64, Value>>>;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into())).init();

    // Generated keys carry a checksum: forged ones are refused before any lookup. Keys from a
    // file may have any shape.
    let (verifier, format) = match std::env::var_os("KEYGATE_KEYS") {
        Some(path) => {
            let verifier = LocalVerifier::from_key_file(&path)?;
            println!("keys loaded from {}", path.to_string_lossy());
            (verifier, KeyFormat::Any)
        }
        None => {
            let verifier = demo_keys().await?;
            let format = verifier.key_format().clone();
            (verifier, format)
        }
    };

    let routes = ScopeMap::new()
        .public("/health")
        .route("/v1/items", "items")
        .route("/v1/items/{id}", "items")
        .route("/v1/admin/stats", "admin")
        .unmapped(Unmapped::Deny);
    let gate = ApiKeyLayer::builder(verifier).key_format(format).routes(routes).build()?;

    let items: Items = Arc::default();
    let app = Router::new()
        .route("/health", get(|| async { Json(json!({ "status": "ok" })) }))
        .route("/v1/items", get(list).post(create))
        .route("/v1/items/{id}", get(read).put(update).delete(remove))
        .route("/v1/admin/stats", get(stats))
        .with_state(items)
        .layer(gate);

    let port: u16 = std::env::var("PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(3000);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).with_graceful_shutdown(async { drop(tokio::signal::ctrl_c().await) }).await?;
    Ok(())
}

/// Three keys with growing rights, printed once: the store keeps only their digests.
async fn demo_keys() -> Result<LocalVerifier, Box<dyn std::error::Error>> {
    let verifier = LocalVerifier::in_memory();
    let demo = [
        ("demo_reader", vec!["items:read"]),
        ("demo_writer", vec!["items:*"]),
        ("demo_admin", vec!["items:*", "admin:read"]),
    ];
    println!("demo keys (shown once):");
    for (id, scopes) in demo {
        let scopes: Vec<Scope> = scopes.iter().map(|s| s.parse()).collect::<Result<_, _>>()?;
        let shown: Vec<String> = scopes.iter().map(Scope::to_string).collect();
        let created = verifier.create(KeyFacts::new(id).with_name(id).with_scopes(scopes)).await?;
        println!("  {id:<12} {:<40} {}", created.key.expose_secret(), shown.join(" "));
    }
    Ok(verifier)
}

async fn list(State(items): State<Items>, key: VerifiedKey) -> Json<Value> {
    let items = items.lock().unwrap();
    Json(json!({ "key": key.id(), "items": items.values().collect::<Vec<_>>() }))
}

async fn create(State(items): State<Items>, Json(mut item): Json<Value>) -> (StatusCode, Json<Value>) {
    let mut items = items.lock().unwrap();
    let id = items.keys().next_back().map_or(1, |last| last + 1);
    item["id"] = id.into();
    items.insert(id, item.clone());
    (StatusCode::CREATED, Json(item))
}

async fn read(State(items): State<Items>, Path(id): Path<u64>) -> Result<Json<Value>, StatusCode> {
    items.lock().unwrap().get(&id).cloned().map(Json).ok_or(StatusCode::NOT_FOUND)
}

async fn update(State(items): State<Items>, Path(id): Path<u64>, Json(mut item): Json<Value>) -> Json<Value> {
    item["id"] = id.into();
    items.lock().unwrap().insert(id, item.clone());
    Json(item)
}

async fn remove(State(items): State<Items>, Path(id): Path<u64>) -> StatusCode {
    match items.lock().unwrap().remove(&id) {
        Some(_) => StatusCode::NO_CONTENT,
        None => StatusCode::NOT_FOUND,
    }
}

async fn stats(State(items): State<Items>, key: VerifiedKey) -> Json<Value> {
    Json(json!({ "items": items.lock().unwrap().len(), "asked_by": key.id() }))
}
