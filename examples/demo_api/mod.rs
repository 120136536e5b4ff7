//! The demo API the examples gate: public `GET /health`, `items` CRUD and `admin` stats.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use keygate::{RouteTable, Unmapped, VerifiedKey};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

type Items = Arc<Mutex<BTreeMap<u64, Value>>>;

/// The route table: `items` and `admin` representations, `/health` public, anything else refused.
pub(crate) fn routes() -> RouteTable {
    RouteTable::new()
        .public("/health")
        .route("/v1/items", "items")
        .route("/v1/items/{id}", "items")
        .route("/v1/admin/stats", "admin")
        .unmapped(Unmapped::Deny)
}

/// The API, without the gate.
pub(crate) fn router() -> Router {
    Router::new()
        .route("/health", get(|| async { Json(json!({ "status": "ok" })) }))
        .route("/v1/items", get(list).post(create))
        .route("/v1/items/{id}", get(read).put(update).delete(remove))
        .route("/v1/admin/stats", get(stats))
        .with_state(Items::default())
}

/// Logs to stderr (`RUST_LOG`, default `info`).
pub(crate) fn init_tracing() {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt().with_env_filter(filter).init();
}

/// Serves `app` on `127.0.0.1:$PORT` (default 3000) until Ctrl-C.
pub(crate) async fn serve(app: Router) -> Result<(), Box<dyn std::error::Error>> {
    let port: u16 = std::env::var("PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(3000);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).with_graceful_shutdown(async { drop(tokio::signal::ctrl_c().await) }).await?;
    Ok(())
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
