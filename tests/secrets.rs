//! No key in logs, `Debug` output or response bodies.
#![cfg(feature = "axum")]

mod common;

use axum::routing::get;
use axum::Router;
use common::*;
use keygate::store::{KeyFile, MemoryStore, StoredKey};
use keygate::verify::VerifyRequest;
use keygate::*;

/// A sink that asks for raw keys, so the request context holds one.
struct KeepsKeys;

impl keygate::usage::UsageSink for KeepsKeys {
    fn record(&self, _: keygate::usage::UsageOf<'_>, _: Option<&str>, _: u64) {}
    fn needs_key(&self) -> bool {
        true
    }
}

/// The part of a key that must never show: all but the short redacted prefix.
fn secret_part(key: &str) -> &str {
    &key[4..]
}

#[tokio::test] // current-thread: the server's tasks log through this test's subscriber
async fn no_key_in_logs_debug_or_bodies() {
    let (logs, _guard) = Captured::start(tracing::Level::TRACE);

    let verifier = LocalVerifier::in_memory();
    let created = verifier.create(KeyFacts::new("k1").with_scopes(["items:read".parse().unwrap()])).await.unwrap();
    let key = created.key.expose_secret().to_owned();
    let forged = format!("{}XXXX", &key[..key.len() - 4]);
    let routes = || RouteTable::new().route("/items", "items");
    let local = ApiKeyLayer::builder(verifier.clone())
        .routes(routes())
        .key_format(verifier.key_format().clone())
        .usage_sink(KeepsKeys)
        .rate_limit(keygate::limit::RateLimit::per_minute("default", 100).unwrap())
        .build()
        .unwrap();
    let remote = ApiKeyLayer::builder(Unreachable).routes(routes()).build().unwrap();
    // The handler echoes the Debug of everything it was given.
    let echo = |key: Option<VerifiedKey>| async move { format!("{key:?} {:?}", key.as_ref().map(|k| k.usage())) };
    let app = |layer: ApiKeyLayer| Router::new().route("/items", get(echo).post(echo)).layer(layer);
    let a = serve_axum(app(local.clone())).await;
    let b = serve_axum(app(remote.clone())).await;

    let mut bodies = String::new();
    for (addr, method, k) in [(a, "GET", &key), (a, "POST", &key), (a, "GET", &forged), (b, "GET", &key)] {
        for header in [("authorization", format!("Bearer {k}")), ("x-api-key", k.clone())] {
            let r = request(addr, method, "/items", &[(header.0, header.1.as_bytes())]).await;
            bodies += &format!("{r:?}");
        }
        let both = [("authorization", format!("Bearer {k}")), ("x-api-key", k.clone())];
        let r =
            request(addr, method, "/items", &both.iter().map(|(n, v)| (*n, v.as_bytes())).collect::<Vec<_>>()).await;
        bodies += &format!("{r:?}");
    }

    let api_key = ApiKey::new(key.clone());
    let file = KeyFile::parse(&format!("[[keys]]\nid = \"a\"\nkey = \"{key}\"\n")).unwrap();
    let load_error = KeyFile::parse(&format!("[[keys]]\nid = \"a\"\nkey = \"{key}\"\nbogus = 1\n")).unwrap_err();
    let debug = [
        format!("{api_key:?} {api_key:#?} {}", api_key.redacted()),
        format!("{:?}", api_key.digest()),
        format!("{created:?} {created:#?}"),
        format!("{:?}", VerifyRequest::new(api_key.clone())),
        format!("{local:?} {remote:?}"),
        format!("{:?}", ApiKeyLayer::builder(verifier.clone())),
        format!("{verifier:?} {:?}", MemoryStore::new()),
        format!("{file:?} {load_error:?} {load_error}"),
        format!("{:?}", StoredKey::new(KeyFacts::new("x"))),
        format!("{:?}", verifier.verify_now(&PresentedKey::new(&key))),
        format!("{:?} {:?}", PresentedKey::new(&key), Fingerprint::of(&key)),
        format!("{:?}", Rejection::InvalidKey(KeyStatus::Invalid)),
        format!("{:?}", keygate::limit::MemoryLimiter::new()),
    ]
    .join("\n");

    drop(_guard);
    let logs = logs.text();
    assert!(logs.contains("keygate: refused"), "the test must see the gate's logs:\n{logs}");
    assert!(bodies.contains("UsageHandle"), "the handler's Debug output must be in the bodies:\n{bodies}");
    for (what, text) in [("logs", &logs), ("debug", &debug), ("bodies", &bodies)] {
        for k in [&key, &forged] {
            assert!(!text.contains(secret_part(k)), "a key leaked into {what}:\n{text}");
        }
    }
}

#[cfg(feature = "oneloop")]
#[tokio::test]
async fn the_oneloop_token_and_buffered_keys_stay_secret() {
    use keygate::oneloop::OneloopVerifier;
    use keygate::oneloop::{BatchConfig, UsageBatcher};
    use keygate::usage::{UsageOf, UsageSink};
    use std::time::Duration;
    let token = "ws_secret_workspace_token_0123456789";
    let oneloop = OneloopVerifier::builder(token).base_url("http://127.0.0.1:9").build().unwrap();
    let batcher = UsageBatcher::new(oneloop.clone(), BatchConfig::default().interval(Duration::from_secs(3600)));
    let key = ApiKey::new("kg_buffered_raw_key_0123456789abcdef");
    batcher.record(UsageOf { key_id: "k1", key: Some(&key) }, Some("tokens"), 5);
    assert_eq!(batcher.pending(), 1);
    let layer = ApiKeyLayer::builder(oneloop.clone()).usage_sink(batcher.clone()).build().unwrap();
    let debug = format!("{oneloop:?} {oneloop:#?} {batcher:?} {batcher:#?} {layer:?}");
    assert!(!debug.contains(&token[4..]), "{debug}");
    assert!(!debug.contains(&key.expose_secret()[4..]), "{debug}");
    // An upstream error names neither.
    let err = oneloop.record_usage(&key, 1, None).await.unwrap_err().to_string();
    assert!(!err.contains(&token[4..]) && !err.contains(&key.expose_secret()[4..]), "{err}");
}
