//! Serves one benchmark variant for `benches/load.sh`: `VARIANT=keygate_local PORT=3900`, on a
//! single-threaded runtime (the script pins it to one core).
//!
//! With `PROFILE=n` it instead runs `n` warm requests in process, inside `profile_requests`, and
//! exits: `valgrind --tool=callgrind --collect-atstart=no --toggle-collect='*profile_requests*'`
//! then counts the instructions of exactly those requests.
//!
//! With `LOAD=n` it instead runs `n` warm requests in process, 64 at a time (what makes the Redis
//! limiter batch), and prints how long they took: with the process's and Redis's CPU time (e.g.
//! `/usr/bin/time`, `INFO commandstats`) this gives each side's cost per decision without HTTP.
//!
//! With `METRICS=prometheus` (and keygate's `metrics` feature) a Prometheus recorder is installed
//! first, so the cost of counting is in the figures.

#[path = "../benches/support/mod.rs"]
mod support;

use axum::body::Body;
use axum::Router;
use tower::ServiceExt;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let variant = std::env::var("VARIANT").unwrap_or_else(|_| "keygate_local".into());
    let port: u16 = std::env::var("PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(3900);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let _metrics = match std::env::var("METRICS").as_deref() {
        Ok("prometheus") => Some(metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?),
        _ => None,
    };
    let keys = support::keys_for(&variant);
    let status = support::expected_status(&variant);
    let app = rt.block_on(async {
        let upstream = support::fake_oneloop().await;
        let (_, app) = support::variants(upstream)
            .await
            .into_iter()
            .find(|(name, _)| *name == variant)
            .ok_or_else(|| format!("no variant {variant}"))?;
        // Warm every key, so what follows measures the warm path.
        for k in &keys {
            assert_eq!(call(&app, k).await, status);
        }
        Ok::<_, Box<dyn std::error::Error>>(app)
    })?;
    if let Some(n) = std::env::var("LOAD").ok().and_then(|n| n.parse::<usize>().ok()) {
        let took = load(&rt, &app, &keys, n, status);
        println!("{variant}: {n} requests in {took:?}");
        return Ok(());
    }
    if let Some(n) = std::env::var("PROFILE").ok().and_then(|n| n.parse::<usize>().ok()) {
        profile_requests(&rt, &app, &keys, n, status);
        println!("{variant}: {n} requests done");
        return Ok(());
    }
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        println!("{variant} ready on {}", listener.local_addr()?);
        axum::serve(listener, app).await?;
        Ok(())
    })
}

async fn call(app: &Router, key: &str) -> u16 {
    let req = http::Request::get("/v1/items").header("authorization", format!("Bearer {key}")).body(Body::empty());
    app.clone().oneshot(req.expect("valid request")).await.expect("infallible").status().as_u16()
}

/// `n` requests cycling `keys`, 64 at a time, each checked to get `status`.
fn load(rt: &tokio::runtime::Runtime, app: &Router, keys: &[String], n: usize, status: u16) -> std::time::Duration {
    const AT_ONCE: usize = 64;
    let started = std::time::Instant::now();
    rt.block_on(async {
        let tasks: Vec<_> = (0..AT_ONCE)
            .map(|t| {
                let (app, keys) = (app.clone(), keys.to_vec());
                tokio::spawn(async move {
                    for i in 0..n / AT_ONCE {
                        assert_eq!(call(&app, &keys[(i * AT_ONCE + t) % keys.len()]).await, status);
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("no request panics");
        }
    });
    started.elapsed()
}

/// `n` requests cycling `keys`, each checked to get `status`.
#[inline(never)]
fn profile_requests(rt: &tokio::runtime::Runtime, app: &Router, keys: &[String], n: usize, status: u16) {
    rt.block_on(async {
        for i in 0..n {
            assert_eq!(call(app, &keys[i % keys.len()]).await, status);
        }
    });
}
