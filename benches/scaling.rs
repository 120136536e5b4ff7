//! Time per warm request as the number of keys grows: 1 000, 100 000 and 1 000 000 keys, keygate's
//! local verifier next to the hand-written `Service` + `Arc<HashMap>` floor and the bare router, in
//! the same process and interleaved, so the machine's drift hits every variant alike.
//!
//! `cargo bench --all-features --bench scaling` (about a minute; `SCALING_KEYS=1000,100000` to pick
//! sizes). Each size prints the median of 5 rounds (and the range) in ns per request, and what
//! keygate adds over the bare router divided by what the floor adds.
//!
//! Requests cycle through every key in a strided order, so at a million keys most lookups miss the
//! CPU caches, as they would under real traffic.

// A plain `main`: criterion's per-benchmark warm-up at a million keys would take minutes.
#![allow(missing_docs)]

mod support;

use axum::body::Body;
use axum::Router;
use std::sync::Arc;
use std::time::Instant;
use tower::ServiceExt;

const ROUNDS: usize = 5;
const REQUESTS_PER_ROUND: usize = 200_000;

async fn call(app: &Router, key: &str) -> u16 {
    let req = http::Request::get("/v1/items").header("authorization", format!("Bearer {key}")).body(Body::empty());
    app.clone().oneshot(req.unwrap()).await.unwrap().status().as_u16()
}

/// Nanoseconds per request over `REQUESTS_PER_ROUND` requests, starting at `offset` in the
/// strided order (a stride coprime with `n`, so every key is visited).
async fn round(app: &Router, keys: &[String], offset: usize) -> f64 {
    let n = keys.len();
    let stride = 7_919; // prime, larger than no size here divides
    let start = Instant::now();
    for i in 0..REQUESTS_PER_ROUND {
        let status = call(app, &keys[(offset + i * stride) % n]).await;
        debug_assert_eq!(status, 200);
    }
    start.elapsed().as_nanos() as f64 / REQUESTS_PER_ROUND as f64
}

fn median_and_range(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn main() {
    let sizes: Vec<usize> = std::env::var("SCALING_KEYS")
        .unwrap_or_else(|_| "1000,100000,1000000".into())
        .split(',')
        .map(|s| s.trim().parse().expect("SCALING_KEYS: sizes separated by commas"))
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    println!(
        "{:>9}  {:>22}  {:>22}  {:>22}  {:>14}",
        "keys", "bare ns", "hand Service ns", "keygate local ns", "added ratio"
    );
    for n in sizes {
        let keys: Vec<String> = (0..n).map(support::key).collect();
        let variants: Vec<Router> = rt.block_on(async {
            let local = support::local_verifier_with(n).await;
            let gate = keygate::ApiKeyLayer::builder(local).routes(support::routes()).build().unwrap();
            vec![
                support::router(),
                support::router().layer(support::HandLayer(Arc::new(support::hand_map_with(n)))),
                support::router().layer(gate),
            ]
        });
        // Warm: every key once through every variant, and check each admits it.
        rt.block_on(async {
            for app in &variants {
                for k in &keys {
                    assert_eq!(call(app, k).await, 200);
                }
            }
        });
        let mut times = vec![Vec::new(); variants.len()];
        for r in 0..ROUNDS {
            for (app, t) in variants.iter().zip(&mut times) {
                t.push(rt.block_on(round(app, &keys, r * REQUESTS_PER_ROUND)));
            }
        }
        let [bare, hand, gate]: [(f64, f64, f64); 3] =
            times.into_iter().map(median_and_range).collect::<Vec<_>>().try_into().unwrap();
        let show = |(m, lo, hi): (f64, f64, f64)| format!("{m:.0} ({lo:.0}-{hi:.0})");
        let ratio = (gate.0 - bare.0) / (hand.0 - bare.0);
        println!("{n:>9}  {:>22}  {:>22}  {:>22}  {ratio:>13.2}x", show(bare), show(hand), show(gate));
    }
}
