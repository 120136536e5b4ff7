//! The quickstart's API for many instances: keys, limits, usage and revocations in Redis (feature
//! `redis`). Start several on different ports; a key disabled through one is refused by all.
//!
//! ```sh
//! REDIS_URL=redis://127.0.0.1:6379 cargo run --example distributed --features redis
//! REDIS_URL=redis://127.0.0.1:6379 PORT=3001 cargo run --example distributed --features redis
//! ```

mod demo_api;

use keygate::cache::{CacheConfig, CachedVerifier};
use keygate::limit::{Fallback, RateLimit, RedisLimiter};
use keygate::store::{KeyStore, RedisKeyStore};
use keygate::{ApiKeyLayer, KeyFacts, LocalVerifier, Scope};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    demo_api::init_tracing();
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let client = redis::Client::open(url.as_str())?;
    let prefix = std::env::var("KEYGATE_PREFIX").unwrap_or_else(|_| "keygate-demo".into());

    let store = RedisKeyStore::new(client.get_connection_manager().await?, &prefix);
    let verifier = LocalVerifier::new(store.clone());
    demo_keys(&verifier, &store).await?;
    let cached = CachedVerifier::new(verifier, CacheConfig::default());
    let cache = cached.clone();
    store.listen(client.clone(), move |digest| cache.invalidate_digest(digest));

    let instances = std::env::var("INSTANCES").ok().and_then(|n| n.parse().ok()).unwrap_or(2);
    let limiter =
        RedisLimiter::new(client.get_connection_manager().await?, &prefix).fallback(Fallback::Local { instances });
    let gate = ApiKeyLayer::builder(cached)
        .limiter(limiter)
        .rate_limit(RateLimit::per_minute("default", 600)?)
        .routes(demo_api::routes())
        .build()?;
    println!("sharing keys, limits and revocations through {url} under {prefix:?}");
    demo_api::serve(demo_api::router().layer(gate)).await
}

/// Creates the demo keys that do not exist yet and prints them (once: Redis keeps only digests).
async fn demo_keys(verifier: &LocalVerifier, store: &RedisKeyStore) -> Result<(), Box<dyn std::error::Error>> {
    for (id, scopes) in [("demo_reader", vec!["items:read"]), ("demo_admin", vec!["items:*", "admin:read"])] {
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
