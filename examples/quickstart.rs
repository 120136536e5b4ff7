//! A small API gated by keygate's embedded local verifier.
//!
//! ```sh
//! cargo run --example quickstart                          # demo keys, printed at start
//! KEYGATE_KEYS=keys.toml cargo run --example quickstart   # keys from a file
//! PORT=8080 cargo run --example quickstart
//! ```
//!
//! Then: `curl -H "Authorization: Bearer <key>" http://127.0.0.1:3000/v1/items`, and
//! `curl http://127.0.0.1:3000/metrics` for what the gate decided (Prometheus text format).

mod demo_api;

use axum::routing::get;
use keygate::{ApiKeyLayer, KeyFacts, KeyFormat, LocalVerifier, Scope};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    demo_api::init_tracing();
    // The exporter is the application's choice; keygate records through the `metrics` facade.
    // Installed before the layer is built, so the gate's counters register with it.
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
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
    let gate = ApiKeyLayer::builder(verifier).key_format(format).routes(demo_api::routes()).build()?;
    // `/metrics` is added after the gate, so it is not behind it.
    let app = demo_api::router().layer(gate).route("/metrics", get(move || std::future::ready(prometheus.render())));
    demo_api::serve(app).await
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
