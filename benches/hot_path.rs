//! Per-request cost of gating, in process: every variant is the same axum router with one small
//! handler, called through `tower::ServiceExt` on a current-thread runtime, cycling 1 000 keys.
//!
//! `cargo bench --all-features --bench hot_path`

// criterion's macros generate an undocumented `main`.
#![allow(missing_docs)]

mod support;

use axum::body::Body;
use axum::Router;
use criterion::{criterion_group, criterion_main, Criterion};
use http::Request;
use std::time::Duration;
use tower::ServiceExt;

fn request(key: &str) -> Request<Body> {
    Request::get("/v1/items").header("authorization", format!("Bearer {key}")).body(Body::empty()).unwrap()
}

async fn call(app: &Router, key: &str) -> u16 {
    app.clone().oneshot(request(key)).await.unwrap().status().as_u16()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let upstream = rt.block_on(support::fake_oneloop());
    let variants = rt.block_on(support::variants(upstream));

    let mut group = c.benchmark_group("request");
    for (name, app) in &variants {
        let keys = support::keys_for(name);
        // Warm every key (fills the Oneloop cache) and check the variant really admits them.
        for k in &keys {
            assert_eq!(rt.block_on(call(app, k)), support::expected_status(name), "{name}");
        }
        let mut i = 0;
        group.bench_function(*name, |b| {
            b.to_async(&rt).iter(|| {
                i = (i + 1) % keys.len();
                call(app, &keys[i])
            })
        });
    }

    // A cold miss: a fresh key each time, verified by the loopback Oneloop over HTTP.
    let oneloop = support::oneloop(upstream);
    let cold = support::router()
        .layer(keygate::ApiKeyLayer::builder(oneloop.clone()).routes(support::routes()).build().unwrap());
    let mut n = 0;
    group.bench_function("keygate_oneloop_cold_miss", |b| {
        b.to_async(&rt).iter(|| {
            n = (n + 1) % support::KEYS;
            oneloop.invalidate(&support::key(n));
            let (app, k) = (&cold, support::key(n));
            async move { call(app, &k).await }
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3)).sample_size(40);
    targets = bench
}
criterion_main!(benches);
