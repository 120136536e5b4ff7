//! No key in logs, span fields, metric names or labels, `Debug` output or response bodies.
#![cfg(feature = "axum")]

mod common;

use axum::routing::get;
use axum::Router;
use common::*;
use keygate::store::{KeyFile, MemoryStore, StoredKey};
use keygate::verify::VerifyRequest;
use keygate::*;
use std::sync::{Arc, Mutex};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

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

/// Every field of every span (as created and as recorded later) and of every event, as text:
/// what any tracing subscriber, an OpenTelemetry exporter included, could be handed.
#[derive(Clone, Default)]
struct AllFields(Arc<Mutex<String>>);

impl Visit for AllFields {
    fn record_str(&mut self, field: &Field, value: &str) {
        *self.0.lock().unwrap() += &format!("{}={value}\n", field.name());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        *self.0.lock().unwrap() += &format!("{}={value:?}\n", field.name());
    }
}

impl<S: tracing::Subscriber> Layer<S> for AllFields {
    fn on_new_span(&self, attrs: &Attributes<'_>, _: &Id, _: Context<'_, S>) {
        *self.0.lock().unwrap() += &format!("span {}\n", attrs.metadata().name());
        attrs.record(&mut self.clone());
    }

    fn on_record(&self, _: &Id, values: &Record<'_>, _: Context<'_, S>) {
        values.record(&mut self.clone());
    }

    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        event.record(&mut self.clone());
    }
}

/// What the gate showed while a test ran on this thread (use a current-thread runtime so the
/// server's tasks run here too): formatted logs at TRACE, every span and event field, and every
/// metric's name and labels.
struct Watched {
    logs: Captured,
    fields: AllFields,
    #[cfg(feature = "metrics")]
    metrics: metrics_util::debugging::Snapshotter,
    _guards: (tracing::subscriber::DefaultGuard, Option<Box<dyn std::any::Any>>),
}

impl Watched {
    fn start() -> Self {
        let (logs, fields) = (Captured::default(), AllFields::default());
        let writer = logs.clone();
        let fmt = tracing_subscriber::fmt::layer().with_writer(move || writer.clone()).with_ansi(false);
        let subscriber = tracing_subscriber::registry()
            .with(fmt.with_filter(tracing_subscriber::filter::LevelFilter::TRACE))
            .with(fields.clone());
        let tracing = tracing::subscriber::set_default(subscriber);
        #[cfg(feature = "metrics")]
        {
            // Leaked so the thread-local guard can borrow it for the test's life.
            let recorder: &'static _ = Box::leak(Box::new(metrics_util::debugging::DebuggingRecorder::new()));
            let metrics = recorder.snapshotter();
            let guard: Box<dyn std::any::Any> = Box::new(metrics::set_default_local_recorder(recorder));
            Self { logs, fields, metrics, _guards: (tracing, Some(guard)) }
        }
        #[cfg(not(feature = "metrics"))]
        Self { logs, fields, _guards: (tracing, None) }
    }

    /// Each place a key could leak into, by name, with what it holds; checked to be non-empty.
    fn seen(self) -> Vec<(&'static str, String)> {
        let logs = [("logs", self.logs.text()), ("span and event fields", self.fields.0.lock().unwrap().clone())];
        let seen: Vec<_> = logs.into_iter().chain(self.metric_names()).collect();
        for (what, text) in &seen {
            assert!(!text.is_empty(), "the test must see the gate's {what}");
        }
        seen
    }

    /// Every metric's name, labels, unit and description.
    #[cfg(feature = "metrics")]
    fn metric_names(&self) -> Option<(&'static str, String)> {
        let mut names = String::new();
        for (key, unit, description, _) in self.metrics.snapshot().into_vec() {
            let labels: Vec<_> = key.key().labels().map(|l| format!("{}={}", l.key(), l.value())).collect();
            names += &format!("{}{{{}}} {unit:?} {description:?}\n", key.key().name(), labels.join(","));
        }
        Some(("metric names and labels", names))
    }

    #[cfg(not(feature = "metrics"))]
    #[allow(clippy::unused_self)]
    fn metric_names(&self) -> Option<(&'static str, String)> {
        None
    }
}

#[tokio::test] // current-thread: the server's tasks log through this test's subscriber
async fn no_key_in_logs_spans_metrics_debug_or_bodies() {
    let watched = Watched::start();

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

    let mut seen = watched.seen();
    assert!(seen[0].1.contains("keygate: refused"), "the test must see the gate's logs:\n{}", seen[0].1);
    assert!(seen[1].1.contains("key_id=k1"), "the test must see the gate's spans:\n{}", seen[1].1);
    assert!(bodies.contains("UsageHandle"), "the handler's Debug output must be in the bodies:\n{bodies}");
    seen.extend([("debug", debug), ("bodies", bodies)]);
    for (what, text) in &seen {
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

/// Every Oneloop path: an upstream that fails (the breaker opens, then a probe closes it), a key
/// verified then served from the cache, a forged key refused then negatively cached, usage
/// buffered with its key and sent. No key in any log, span field or metric.
#[cfg(feature = "oneloop")]
#[tokio::test]
async fn no_key_in_logs_spans_or_metrics_on_the_oneloop_paths() {
    use common::oneloop::{answer, start, Behaviour, TOKEN};
    use keygate::breaker::BreakerConfig;
    use keygate::cache::{CacheConfig, CachedVerifier};
    use keygate::oneloop::{BatchConfig, OneloopVerifier, UsageBatcher};
    use std::time::Duration;

    /// The status of a `GET /items` with `key` as a bearer token.
    async fn status(addr: std::net::SocketAddr, key: &str) -> u16 {
        fetch(addr, "/items", &[("authorization", format!("Bearer {key}").as_bytes())]).await.status.as_u16()
    }

    let watched = Watched::start();
    let (upstream, fake) = start().await;
    let (key, forged) = ("kg_live_remote_secret_0123456789abcdef", "kg_live_remote_forged_0123456789abcdef");
    fake.add(key, answer("k-remote", &["items:read"]));
    let breaker = BreakerConfig::default().failure_threshold(2).cool_down(Duration::from_millis(100));
    let base = format!("http://{upstream}");
    let oneloop = OneloopVerifier::builder(TOKEN).base_url(base).breaker(breaker).build().unwrap();
    let batcher = UsageBatcher::new(oneloop.clone(), BatchConfig::default());
    let verifier = CachedVerifier::new(oneloop, CacheConfig::default());
    let routes = RouteTable::new().route_with("/items", "items", RoutePolicy::new().usage(1, None));
    let layer = ApiKeyLayer::builder(verifier).routes(routes).usage_sink(batcher.clone()).build().unwrap();
    let addr = serve_axum(Router::new().route("/items", get(|| async { "ok" })).layer(layer)).await;

    fake.set(Behaviour::Status500);
    for k in [key, forged, key] {
        assert_eq!(status(addr, k).await, 503, "failing, then open");
    }
    fake.set(Behaviour::Normal);
    tokio::time::sleep(Duration::from_millis(150)).await;
    for (k, expected) in [(key, 200), (key, 200), (forged, 401), (forged, 401)] {
        assert_eq!(status(addr, k).await, expected);
    }
    let report = batcher.shutdown(Duration::from_secs(5)).await;
    assert_eq!((report.recorded, report.acknowledged), (2, 2));

    let seen = watched.seen();
    for needle in ["breaker", "k-remote"] {
        assert!(seen.iter().any(|(_, text)| text.contains(needle)), "the test must see {needle}:\n{seen:?}");
    }
    for (what, text) in &seen {
        for secret in [secret_part(key), secret_part(forged), secret_part(TOKEN)] {
            assert!(!text.contains(secret), "a secret leaked into {what}:\n{text}");
        }
    }
}
