//! The quickstart's API for many instances: keys, limits, usage and revocations in Redis (feature
//! `redis`). Start several on different ports; a key disabled through one is refused by all.
//!
//! ```sh
//! REDIS_URL=redis://127.0.0.1:6379 cargo run --example distributed --features redis
//! REDIS_URL=redis://127.0.0.1:6379 PORT=3001 cargo run --example distributed --features redis
//! # with the admin key both printed at the first start:
//! curl -X POST -H "x-api-key: $ADMIN" localhost:3000/v1/admin/keys/demo_reader/disable
//! curl -H "x-api-key: $READER" localhost:3001/v1/items     # 401 on the other instance too
//! ```

mod demo_api;

use axum::extract::Path;
use axum::http::StatusCode;
use axum::routing::post;
use keygate::cache::{CacheConfig, CachedVerifier};
use keygate::limit::{Fallback, RateLimit, RedisLimiter};
use keygate::store::{EvictionPolicy, StoreError};
use keygate::store::{KeyStore, RedisKeyStore};
use keygate::{ApiKeyLayer, KeyFacts, LocalVerifier, RedisConnection, Scope};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    demo_api::init_tracing();
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let conn = RedisConnection::open(&url)?;
    let prefix = std::env::var("KEYGATE_PREFIX").unwrap_or_else(|_| "keygate-demo".into());

    let store = RedisKeyStore::new(conn.clone(), &prefix);
    store.check(EvictionPolicy::Warn).await?;
    let verifier = LocalVerifier::new(store.clone());
    demo_keys(&verifier, &store).await?;
    let cached = CachedVerifier::new(verifier, CacheConfig::default());
    let cache = cached.clone();
    store.listen(move |revoked| cache.revoke(revoked));

    let instances = std::env::var("INSTANCES").ok().and_then(|n| n.parse().ok()).unwrap_or(2);
    let limiter = RedisLimiter::new(conn, &prefix).fallback(Fallback::Local { instances });
    let admin = LocalVerifier::new(store.clone());
    let gate = ApiKeyLayer::builder(cached)
        .limiter(limiter)
        .rate_limit(RateLimit::per_minute("default", 600)?)
        .routes(demo_api::routes().route("/v1/admin/keys/{id}/disable", "admin"))
        .build()?;
    println!("sharing keys, limits and revocations through {url} under {prefix:?}");
    let app = demo_api::router().route("/v1/admin/keys/{id}/disable", post(move |id| disable(admin.clone(), id)));
    demo_api::serve(app.layer(gate)).await
}

/// `POST /v1/admin/keys/{id}/disable` (scope `admin:create`): every instance refuses the key
/// within milliseconds.
async fn disable(admin: LocalVerifier, Path(id): Path<String>) -> StatusCode {
    match admin.disable(&id).await {
        Ok(()) => StatusCode::NO_CONTENT,
        Err(StoreError::NotFound(_)) => StatusCode::NOT_FOUND,
        Err(_) => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// Creates the demo keys that do not exist yet and prints them (once: Redis keeps only digests).
async fn demo_keys(verifier: &LocalVerifier, store: &RedisKeyStore) -> Result<(), Box<dyn std::error::Error>> {
    for (id, scopes) in [("demo_reader", vec!["items:read"]), ("demo_admin", vec!["items:*", "admin:*"])] {
        if store.find(id).await?.is_some() {
            println!("  {id:<12} exists (its key was printed by the instance that created it)");
            continue;
        }
        let scopes: Vec<Scope> = scopes.iter().map(|s| s.parse()).collect::<Result<_, _>>()?;
        let created = verifier.create(KeyFacts::new(id).with_scopes(scopes)).await?;
        println!("  {id:<12} {}", created.key.expose_secret());
    }
    Ok(())
}
