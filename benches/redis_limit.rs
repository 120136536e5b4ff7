//! The Redis limiter against the in-memory one, in the same run: the same gate with the same
//! huge limit, one request at a time (latency: a Redis round trip each, or none in local-first
//! mode) and 32 at once (throughput: the 32 go to Redis as one batch). Needs `REDIS_URL`; uses
//! a prefix of its own and deletes its keys at the end.
//!
//! `REDIS_URL=redis://127.0.0.1:6379 cargo bench --all-features --bench redis_limit`

// criterion's macros generate an undocumented `main`.
#![allow(missing_docs)]

mod support;

use axum::body::Body;
use axum::Router;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http::Request;
use keygate::limit::{MemoryLimiter, RateLimit, RedisLimiter};
use keygate::{ApiKeyLayer, RedisConnection};
use std::time::Duration;
use tower::ServiceExt;

async fn call(app: &Router, key: &str) -> u16 {
    let request = Request::get("/v1/items").header("authorization", format!("Bearer {key}")).body(Body::empty());
    app.clone().oneshot(request.unwrap()).await.unwrap().status().as_u16()
}

fn bench(c: &mut Criterion) {
    let Ok(url) = std::env::var("REDIS_URL") else {
        eprintln!("REDIS_URL is not set: the Redis limiter benchmark is skipped");
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let prefix = format!("kgbench:{}", std::process::id());
    let conn = RedisConnection::open(&url).unwrap();
    rt.block_on(conn.check()).unwrap();
    let verifier = rt.block_on(support::local_verifier());
    let limit = RateLimit::new("default", RateLimit::MAX_LIMIT, Duration::from_secs(3600)).unwrap();
    let gate = |limiter: Box<dyn Fn(keygate::ApiKeyLayerBuilder) -> keygate::ApiKeyLayerBuilder>| {
        let builder =
            limiter(ApiKeyLayer::builder(verifier.clone()).routes(support::routes()).rate_limit(limit.clone()));
        support::router().layer(builder.build().unwrap())
    };
    let variants = [
        ("memory_limiter", gate(Box::new(|b| b.limiter(MemoryLimiter::new())))),
        ("redis_limiter", gate(Box::new(|b| b.limiter(RedisLimiter::new(conn.clone(), &prefix))))),
        (
            "redis_limiter_local_first",
            gate(Box::new(|b| b.limiter(RedisLimiter::new(conn.clone(), &prefix).local_first(100)))),
        ),
    ];
    let keys = support::keys_for("keygate_local");
    for (name, app) in &variants {
        for k in &keys {
            assert_eq!(rt.block_on(call(app, k)), 200, "{name}");
        }
    }

    let mut one = c.benchmark_group("limiter_one_at_a_time");
    for (name, app) in &variants {
        let mut i = 0;
        one.bench_function(*name, |b| {
            b.to_async(&rt).iter(|| {
                i = (i + 1) % keys.len();
                call(app, &keys[i])
            })
        });
    }
    one.finish();

    const AT_ONCE: usize = 32;
    let mut many = c.benchmark_group("limiter_32_at_once");
    many.throughput(Throughput::Elements(AT_ONCE as u64));
    for (name, app) in &variants {
        let mut i = 0;
        many.bench_function(*name, |b| {
            b.to_async(&rt).iter(|| {
                i = (i + AT_ONCE) % keys.len();
                let batch: Vec<_> = (0..AT_ONCE).map(|j| call(app, &keys[(i + j) % keys.len()])).collect();
                futures_util::future::join_all(batch)
            })
        });
    }
    many.finish();

    let mut conn = conn;
    let found: Vec<String> =
        rt.block_on(redis::cmd("KEYS").arg(format!("{prefix}:*")).query_async(&mut conn)).unwrap_or_default();
    if !found.is_empty() {
        let _: redis::RedisResult<()> = rt.block_on(redis::cmd("DEL").arg(found).query_async(&mut conn));
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3)).sample_size(30);
    targets = bench
}
criterion_main!(benches);
