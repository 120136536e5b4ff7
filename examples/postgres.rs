//! The quickstart's API with its keys of record in PostgreSQL (feature `postgres`): migrations
//! applied at start, revocations by `LISTEN/NOTIFY`, keys managed with the `keygate` tool.
//!
//! ```sh
//! export DATABASE_URL=postgres://postgres@127.0.0.1:5432/test
//! cargo run --example postgres --features postgres                 # migrates, serves on :3000
//! cargo run --features cli,postgres --bin keygate -- --store "$DATABASE_URL" \
//!     keys create --id reader --scope items:read                    # prints the key, once
//! curl -H "x-api-key: <that key>" localhost:3000/v1/items           # 200
//! cargo run --features cli,postgres --bin keygate -- --store "$DATABASE_URL" \
//!     keys rotate reader --grace 1h                                 # old and new both work for 1 h
//! cargo run --features cli,postgres --bin keygate -- --store "$DATABASE_URL" \
//!     keys disable reader                                           # refused within milliseconds
//! ```
//!
//! A request made with a key in its grace window gets an `x-key-grace-ends` header (Unix seconds)
//! here, from `VerifiedKey::grace_ends`, so the caller learns to switch before the window ends.

mod demo_api;

use axum::extract::Request;
use axum::middleware::{from_fn, Next};
use axum::response::Response;
use keygate::cache::{CacheConfig, CachedVerifier};
use keygate::store::PostgresKeyStore;
use keygate::{ApiKeyLayer, LocalVerifier, VerifiedKey};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    demo_api::init_tracing();
    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let schema = std::env::var("KEYGATE_SCHEMA").unwrap_or_else(|_| "keygate".into());
    let store = PostgresKeyStore::connect_lazy(&url)?.in_schema(&schema)?;
    store.migrate().await?; // explicit, once per start; safe from many instances at once
    let verifier = CachedVerifier::new(LocalVerifier::new(store.clone()), CacheConfig::default());
    let cache = verifier.clone();
    store.listen(move |revoked| cache.revoke(revoked));
    let gate = ApiKeyLayer::builder(verifier).routes(demo_api::routes()).build()?;
    let app = demo_api::router().layer(from_fn(warn_in_grace)).layer(gate);
    println!("keys in PostgreSQL, schema {schema}; manage them with the `keygate` tool");
    demo_api::serve(app).await
}

/// Tells a caller whose key was rotated away when it stops working.
async fn warn_in_grace(request: Request, next: Next) -> Response {
    let ends = request.extensions().get::<VerifiedKey>().and_then(VerifiedKey::grace_ends);
    let mut response = next.run(request).await;
    if let Some(ends) = ends {
        let secs = ends.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
        response.headers_mut().insert("x-key-grace-ends", secs.into());
    }
    response
}
