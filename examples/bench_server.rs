//! Serves one benchmark variant for `benches/load.sh`: `VARIANT=keygate_local PORT=3900`, on a
//! single-threaded runtime (the script pins it to one core).

#[path = "../benches/support/mod.rs"]
mod support;

use axum::body::Body;
use tower::ServiceExt;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let variant = std::env::var("VARIANT").unwrap_or_else(|_| "keygate_local".into());
    let port: u16 = std::env::var("PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(3900);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let upstream = support::fake_oneloop().await;
        let (_, app) = support::variants(upstream)
            .await
            .into_iter()
            .find(|(name, _)| *name == variant)
            .ok_or_else(|| format!("no variant {variant}"))?;
        // Warm every key, so the run measures the warm path.
        for k in support::keys_for(&variant) {
            let req =
                http::Request::get("/v1/items").header("authorization", format!("Bearer {k}")).body(Body::empty())?;
            assert_eq!(app.clone().oneshot(req).await?.status(), 200);
        }
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        println!("{variant} ready on {}", listener.local_addr()?);
        axum::serve(listener, app).await?;
        Ok(())
    })
}
