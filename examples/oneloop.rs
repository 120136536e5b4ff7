//! The quickstart's API, gated by Oneloop (feature `oneloop`).
//!
//! ```sh
//! ONELOOP_API_KEY=ws_… cargo run --example oneloop --features oneloop
//! ONELOOP_BASE_URL=http://127.0.0.1:9000 ONELOOP_API_KEY=… cargo run --example oneloop --features oneloop
//! ```

mod demo_api;

use keygate::oneloop::{OneloopVerifier, DEFAULT_BASE_URL};
use keygate::ApiKeyLayer;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    demo_api::init_tracing();
    let token = std::env::var("ONELOOP_API_KEY").map_err(|_| "set ONELOOP_API_KEY to your Oneloop workspace token")?;
    let base_url = std::env::var("ONELOOP_BASE_URL").unwrap_or_else(|_| DEFAULT_BASE_URL.into());
    println!("verifying keys with {base_url}");
    let oneloop = OneloopVerifier::builder(token).base_url(base_url).build()?;
    let gate = ApiKeyLayer::builder(oneloop).routes(demo_api::routes()).build()?;
    demo_api::serve(demo_api::router().layer(gate)).await
}
