//! The extraction rules over HTTP, and that a key rejected early never reaches the verifier.
#![cfg(feature = "axum")]

mod common;

use axum::routing::get;
use axum::Router;
use common::*;
use http::HeaderMap;
use keygate::{ApiKeyLayer, KeyFacts, KeyFormat, KeySource, LocalVerifier, VerifiedKey};
use std::net::SocketAddr;

/// Echoes the verified key id and whether any credential header reached the handler.
async fn echo(key: Option<VerifiedKey>, headers: HeaderMap, uri: http::Uri) -> String {
    let seen = ["authorization", "x-api-key", "x-custom-key"].iter().any(|h| headers.contains_key(*h));
    format!("{}|{}|{}", key.map_or("-".into(), |k| k.id().to_owned()), seen, uri.query().unwrap_or(""))
}

/// A verifier holding key `k1`, counting its calls, and the layer over it.
async fn gate(
    configure: impl FnOnce(keygate::ApiKeyLayerBuilder) -> keygate::ApiKeyLayerBuilder,
) -> (ApiKeyLayer, String, Counting<LocalVerifier>) {
    let verifier = LocalVerifier::in_memory();
    let key = verifier.create(KeyFacts::new("k1")).await.unwrap().key.expose_secret().to_owned();
    let counting = Counting::new(verifier);
    (configure(ApiKeyLayer::builder(counting.clone())).build().unwrap(), key, counting)
}

async fn setup(
    configure: impl FnOnce(keygate::ApiKeyLayerBuilder) -> keygate::ApiKeyLayerBuilder,
) -> (SocketAddr, String, Counting<LocalVerifier>) {
    let (layer, key, counting) = gate(configure).await;
    let app = Router::new().route("/x", get(echo)).layer(layer);
    (serve_axum(app).await, key, counting)
}

/// The same gate in front of a plain hyper service (no axum), which echoes the key id it got.
async fn setup_hyper(
    configure: impl FnOnce(keygate::ApiKeyLayerBuilder) -> keygate::ApiKeyLayerBuilder,
) -> (SocketAddr, String, Counting<LocalVerifier>) {
    let (layer, key, counting) = gate(configure).await;
    let inner = tower::service_fn(|req: http::Request<hyper::body::Incoming>| async move {
        let id = req.extensions().get::<VerifiedKey>().map_or("-".into(), |k| k.id().to_owned());
        let seen = ["authorization", "x-api-key"].iter().any(|h| req.headers().contains_key(*h));
        let body = format!("{id}|{seen}|{}", req.uri().query().unwrap_or(""));
        Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(bytes::Bytes::from(body))))
    });
    (serve_hyper(tower::ServiceBuilder::new().layer(layer).service(inner)).await, key, counting)
}

#[tokio::test]
async fn default_sources_accept_bearer_and_x_api_key() {
    let (addr, key, _) = setup(|b| b).await;
    for value in
        [format!("Bearer {key}"), format!("bearer {key}"), format!("BEARER   {key}  "), format!("\tBearer\t{key}")]
    {
        let r = fetch(addr, "/x", &[("authorization", value.as_bytes())]).await;
        assert_eq!(r.body, "k1|false|", "{value:?}");
    }
    assert_eq!(fetch(addr, "/x", &[("x-api-key", format!("  {key} ").as_bytes())]).await.body, "k1|false|");
    // A query parameter is not a source unless configured.
    assert_eq!(fetch(addr, &format!("/x?api_key={key}"), &[]).await.status, 401);
    // Another scheme is not an API key.
    assert_eq!(
        fetch(addr, "/x", &[("authorization", b"Basic dXNlcjpwYXNz")]).await.json()["type"],
        "urn:keygate:problem:missing-key"
    );
}

#[tokio::test]
async fn opt_in_sources_and_hiding() {
    let custom = http::HeaderName::from_static("x-custom-key");
    let (addr, key, _) = setup(|b| b.sources([KeySource::Header(custom), KeySource::Query("api_key".into())])).await;
    assert_eq!(fetch(addr, "/x", &[("x-custom-key", key.as_bytes())]).await.body, "k1|false|");
    assert_eq!(fetch(addr, &format!("/x?a=1&api_key={key}&b=2"), &[]).await.body, "k1|false|a=1&b=2");
    // Bearer is no longer a source.
    assert_eq!(fetch(addr, "/x", &[("authorization", format!("Bearer {key}").as_bytes())]).await.status, 401);

    let (addr, key, _) = setup(|b| b.hide_credentials(false)).await;
    assert_eq!(fetch(addr, "/x", &[("x-api-key", key.as_bytes())]).await.body, "k1|true|");
}

#[tokio::test]
async fn bad_keys_are_refused_before_the_verifier() {
    let format = || KeyFormat::checksummed("kg_").unwrap();
    // Behind axum, and behind a plain hyper service: the rules are the gate's, not the router's.
    for (addr, key, counting) in
        [setup(|b| b.key_format(format())).await, setup_hyper(|b| b.key_format(format())).await]
    {
        bad_keys_against(addr, key, counting).await;
    }
}

/// The key with its last (checksum) character replaced by a different one: a fixed replacement
/// would be the key itself whenever the checksum already ends in it.
fn last_char_changed(key: &str) -> String {
    let (body, last) = key.split_at(key.len() - 1);
    format!("{body}{}", if last == "0" { '1' } else { '0' })
}

async fn bad_keys_against(addr: SocketAddr, key: String, counting: Counting<LocalVerifier>) {
    let bearer = format!("Bearer {key}");
    type Headers = Vec<(&'static str, Vec<u8>)>;
    let cases: Vec<(&str, Headers, u16, &str)> = vec![
        ("no key", vec![], 401, "missing-key"),
        ("empty bearer", vec![("authorization", b"Bearer".to_vec())], 401, "malformed-key"),
        ("empty header", vec![("x-api-key", b"".to_vec())], 401, "malformed-key"),
        ("inner space", vec![("authorization", b"Bearer a b".to_vec())], 401, "malformed-key"),
        ("non-ascii", vec![("x-api-key", b"kg_\xc3\xa9\xff".to_vec())], 401, "malformed-key"),
        ("257 bytes", vec![("x-api-key", vec![b'a'; 257])], 401, "malformed-key"),
        ("8 KiB", vec![("x-api-key", vec![b'a'; 8192])], 401, "malformed-key"),
        (
            "two authorization",
            vec![("authorization", bearer.clone().into_bytes()), ("authorization", bearer.clone().into_bytes())],
            400,
            "ambiguous-key",
        ),
        (
            "two x-api-key",
            vec![("x-api-key", key.clone().into_bytes()), ("x-api-key", key.clone().into_bytes())],
            400,
            "ambiguous-key",
        ),
        ("folded x-api-key", vec![("x-api-key", format!("{key}, {key}").into_bytes())], 400, "ambiguous-key"),
        (
            "folded authorization",
            vec![("authorization", format!("{bearer}, {bearer}").into_bytes())],
            400,
            "ambiguous-key",
        ),
        (
            "folded, bearer second",
            vec![("authorization", format!("Basic abc, {bearer}").into_bytes())],
            400,
            "ambiguous-key",
        ),
        (
            "two sources",
            vec![("authorization", bearer.clone().into_bytes()), ("x-api-key", key.clone().into_bytes())],
            400,
            "ambiguous-key",
        ),
        ("bad checksum", vec![("x-api-key", last_char_changed(&key).into_bytes())], 401, "invalid-key"),
        ("wrong prefix", vec![("x-api-key", format!("xx_{}", &key[3..]).into_bytes())], 401, "invalid-key"),
    ];
    for (name, headers, status, kind) in cases {
        let refs: Vec<(&str, &[u8])> = headers.iter().map(|(n, v)| (*n, v.as_slice())).collect();
        let r = fetch(addr, "/x", &refs).await;
        assert_eq!(r.status.as_u16(), status, "{name}: {}", r.body);
        assert_eq!(r.json()["type"], format!("urn:keygate:problem:{kind}"), "{name}");
    }
    assert_eq!(counting.calls(), 0, "no rejected-early key may reach the verifier");
    // The good key does reach it.
    assert_eq!(fetch(addr, "/x", &[("x-api-key", key.as_bytes())]).await.body, "k1|false|");
    assert_eq!(counting.calls(), 1);
}

#[tokio::test]
async fn the_cap_is_configurable() {
    let (addr, _, _) = setup(|b| b.max_key_len(8)).await;
    assert_eq!(
        fetch(addr, "/x", &[("x-api-key", b"123456789")]).await.json()["type"],
        "urn:keygate:problem:malformed-key"
    );
    assert_eq!(
        fetch(addr, "/x", &[("x-api-key", b"12345678")]).await.json()["type"],
        "urn:keygate:problem:invalid-key"
    );
}

#[test]
fn misconfiguration_says_what_is_wrong() {
    let err = |b: keygate::ApiKeyLayerBuilder| b.build().unwrap_err().to_string();
    let v = LocalVerifier::in_memory;
    assert!(err(ApiKeyLayer::builder(v()).sources([])).contains("no key source"));
    assert!(err(ApiKeyLayer::builder(v()).sources([KeySource::Bearer, KeySource::Bearer])).contains("twice"));
    assert!(err(ApiKeyLayer::builder(v()).sources([KeySource::Query("a&b".into())])).contains("query parameter"));
    assert!(err(ApiKeyLayer::builder(v()).max_key_len(0)).contains("max_key_len"));
    assert!(
        err(ApiKeyLayer::builder(v()).routes(keygate::RouteTable::new().route("/a/{x}", "a").route("/a/{y}", "b")))
            .contains("/a/{y}")
    );
}
