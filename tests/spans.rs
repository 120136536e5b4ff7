//! A span per gated request (`keygate`, DEBUG) with the fields a `TraceLayer` user joins on:
//! outcome, cause, route, key id, scope, cache; the inner service runs inside it; no key in it.
#![cfg(feature = "axum")]

mod common;

use axum::routing::get;
use axum::Router;
use common::{fetch, serve_axum};
use keygate::cache::{CacheConfig, CachedVerifier};
use keygate::{ApiKeyLayer, KeyFacts, LocalVerifier, RouteTable, Scope};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

type Fields = BTreeMap<String, String>;
/// An event's message, and the fields of the `keygate` span it was inside, if any.
type Seen = (String, Option<Fields>);

/// Keeps every closed `keygate` span's fields, and the span each event was inside.
#[derive(Clone, Default)]
struct Capture {
    open: Arc<Mutex<BTreeMap<u64, Fields>>>,
    closed: Arc<Mutex<Vec<Fields>>>,
    events: Arc<Mutex<Vec<Seen>>>,
}

struct Into<'a>(&'a mut Fields);

impl Visit for Into<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _: Context<'_, S>) {
        if attrs.metadata().name() == "keygate" {
            let mut fields = Fields::new();
            attrs.record(&mut Into(&mut fields));
            self.open.lock().unwrap().insert(id.into_u64(), fields);
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
        if let Some(fields) = self.open.lock().unwrap().get_mut(&id.into_u64()) {
            values.record(&mut Into(fields));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut fields = Fields::new();
        event.record(&mut Into(&mut fields));
        let inside =
            ctx.lookup_current().and_then(|span| self.open.lock().unwrap().get(&span.id().into_u64()).cloned());
        self.events.lock().unwrap().push((fields.get("message").cloned().unwrap_or_default(), inside));
    }

    fn on_close(&self, id: Id, _: Context<'_, S>) {
        if let Some(fields) = self.open.lock().unwrap().remove(&id.into_u64()) {
            self.closed.lock().unwrap().push(fields);
        }
    }
}

fn fields(pairs: &[(&str, &str)]) -> Fields {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[tokio::test]
async fn each_gated_request_has_a_span_with_the_verdict_and_the_handler_runs_inside_it() {
    let capture = Capture::default();
    let _installed = tracing::subscriber::set_default(tracing_subscriber::registry().with(capture.clone()));

    let local = LocalVerifier::in_memory();
    let key = local.create(KeyFacts::new("kid-reader").with_scopes(["items:read".parse::<Scope>().unwrap()])).await;
    let key = key.unwrap().key;
    // Behind a cache: the first request waits for the verifier, the second is answered at once.
    let verifier = CachedVerifier::new(local, CacheConfig::default());
    let layer = ApiKeyLayer::builder(verifier).routes(RouteTable::new().route("/items/{id}", "items")).build().unwrap();
    let handler = || async {
        tracing::info!("handler ran");
        "ok"
    };
    let addr = serve_axum(Router::new().route("/items/{id}", get(handler)).layer(layer)).await;
    let good = key.expose_secret().as_bytes();

    assert_eq!(fetch(addr, "/items/7", &[("x-api-key", good)]).await.status, 200);
    assert_eq!(fetch(addr, "/items/8", &[("x-api-key", good)]).await.status, 200);
    assert_eq!(fetch(addr, "/items/9", &[("x-api-key", b"kg_forged_key")]).await.status, 401);
    assert_eq!(fetch(addr, "/items/9", &[]).await.status, 401);

    let passed = |cache| {
        fields(&[
            ("outcome", "pass"),
            ("cause", "key"),
            ("route", "/items/{id}"),
            ("key_id", "kid-reader"),
            ("scope", "items:read"),
            ("cache", cache),
        ])
    };
    let closed = capture.closed.lock().unwrap().clone();
    assert_eq!(
        closed,
        [
            passed("miss"),
            passed("hit"),
            fields(&[
                ("outcome", "refused"),
                ("cause", "invalid-key"),
                ("route", "/items/{id}"),
                ("scope", "items:read"),
                ("cache", "miss"),
            ]),
            fields(&[
                ("outcome", "refused"),
                ("cause", "missing-key"),
                ("route", "/items/{id}"),
                ("scope", "items:read")
            ]),
        ]
    );
    // The handler's events are inside the gate's span, with its verdict (both requests that got there).
    let handler_events: Vec<_> =
        capture.events.lock().unwrap().iter().filter(|(m, _)| m == "handler ran").map(|(_, s)| s.clone()).collect();
    assert_eq!(handler_events.len(), 2);
    assert!(handler_events.iter().all(|inside| inside.as_ref().and_then(|f| f.get("key_id")).is_some()));
    // No key, whole or in part, in any span field or event.
    let secret = &key.expose_secret()[3..12];
    for text in closed.iter().flat_map(|f| f.values()).chain(capture.events.lock().unwrap().iter().map(|(m, _)| m)) {
        assert!(!text.contains(secret) && !text.contains("kg_forged"), "key material in {text}");
    }
}
