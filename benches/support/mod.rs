//! What every benchmark shares: 1 000 keys with realistic facts, one router with one small
//! handler, and the variants of gating it.
#![allow(dead_code)]

use axum::extract::{Request, State};
use axum::middleware::{from_fn_with_state, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::future::{ready, Either, Ready};
use http::header::{HeaderValue, AUTHORIZATION};
use http::StatusCode;
use keygate::limit::{HeaderStyle, RateLimit};
use keygate::oneloop::OneloopVerifier;
use keygate::Action;
use keygate::{ApiKey, ApiKeyLayer, KeyFacts, LocalVerifier, RouteTable, Scope};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use tower_governor::governor::GovernorConfigBuilder;
use tower_governor::key_extractor::KeyExtractor;
use tower_governor::{GovernorError, GovernorLayer};
use tower_http::validate_request::ValidateRequestHeaderLayer;

pub(crate) const KEYS: usize = 1_000;

/// Key `i`: 35 characters, like a real one.
pub(crate) fn key(i: usize) -> String {
    format!("kb_bench{i:06}xxxxxxxxxxxxxxxxxxxxx")
}

/// About 280 bytes of facts: an id, two scopes, a metadata entry, a customer.
pub(crate) fn facts(i: usize) -> KeyFacts {
    KeyFacts::new(format!("key_{i:06}"))
        .with_name("benchmark key")
        .with_scopes(["items:read,create".parse::<Scope>().unwrap(), "orders:read".parse().unwrap()])
        .with_metadata("plan", "pro")
        .with_customer(format!("cus_{i:06}"))
}

/// The API: one small handler.
pub(crate) fn router() -> Router {
    Router::new().route("/v1/items", get(|| async { "ok" }))
}

pub(crate) fn routes() -> RouteTable {
    RouteTable::new().route("/v1/items", "items")
}

pub(crate) async fn local_verifier() -> LocalVerifier {
    local_verifier_with(KEYS).await
}

/// A local verifier holding keys `0..n`.
pub(crate) async fn local_verifier_with(n: usize) -> LocalVerifier {
    let verifier = LocalVerifier::in_memory();
    for i in 0..n {
        verifier.add(&ApiKey::new(key(i)), facts(i)).await.unwrap();
    }
    verifier
}

/// What a user writes by hand: a `HashMap` from key to context, and a `from_fn` middleware.
#[derive(Clone, Debug)]
pub(crate) struct HandContext {
    pub id: String,
    pub name: Option<String>,
    pub scopes: Vec<Scope>,
    pub metadata: BTreeMap<String, String>,
    pub customer_id: Option<String>,
}

/// What a user would hold metadata in.
pub(crate) fn hand_metadata(m: &keygate::verify::Metadata) -> BTreeMap<String, String> {
    m.iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
}

/// Key `i`'s facts, as a user would hold them.
pub(crate) fn hand_context(i: usize) -> HandContext {
    let f = facts(i);
    HandContext {
        id: f.id,
        name: f.name,
        scopes: f.scopes,
        metadata: hand_metadata(&f.metadata),
        customer_id: f.customer_id,
    }
}

pub(crate) fn hand_map() -> HashMap<String, Arc<HandContext>> {
    hand_map_with(KEYS)
}

/// The hand-written map of keys `0..n`.
pub(crate) fn hand_map_with(n: usize) -> HashMap<String, Arc<HandContext>> {
    (0..n).map(|i| (key(i), Arc::new(hand_context(i)))).collect()
}

/// The tightest hand-written gate, the floor keygate is measured against: a tower `Service` that
/// parses `Bearer`, looks the key up in an `Arc<HashMap>`, checks the route's scope and inserts the
/// context as an extension. No `from_fn` adapter, no boxing: what a careful user writes by hand.
#[derive(Clone)]
pub(crate) struct HandService<S> {
    keys: Arc<HashMap<String, Arc<HandContext>>>,
    inner: S,
}

/// Layers [`HandService`] over a router.
#[derive(Clone)]
pub(crate) struct HandLayer(pub Arc<HashMap<String, Arc<HandContext>>>);

impl<S> tower::Layer<S> for HandLayer {
    type Service = HandService<S>;
    fn layer(&self, inner: S) -> HandService<S> {
        HandService { keys: self.0.clone(), inner }
    }
}

impl<S, B> tower::Service<http::Request<B>> for HandService<S>
where
    S: tower::Service<http::Request<B>, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let key =
            req.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        let status = match key.and_then(|k| self.keys.get(k)) {
            Some(ctx) if ctx.scopes.iter().any(|s| s.allows("items", Action::Read)) => {
                req.extensions_mut().insert(ctx.clone());
                return Either::Left(self.inner.call(req));
            }
            Some(_) => StatusCode::FORBIDDEN,
            None => StatusCode::UNAUTHORIZED,
        };
        Either::Right(ready(Ok(status.into_response())))
    }
}

/// tower_governor keyed by the `Authorization` header: a rate limit per key, no verification.
#[derive(Clone)]
pub(crate) struct ByHeader;

impl KeyExtractor for ByHeader {
    type Key = HeaderValue;
    fn extract<T>(&self, req: &http::Request<T>) -> Result<HeaderValue, GovernorError> {
        req.headers().get(AUTHORIZATION).cloned().ok_or(GovernorError::UnableToExtractKey)
    }
}

fn governed(router: Router) -> Router {
    // Generous, like the keygate limit variants: every request is admitted, the limiter still decides.
    let mut config = GovernorConfigBuilder::default().per_nanosecond(1).burst_size(u32::MAX).key_extractor(ByHeader);
    router.layer(GovernorLayer::new(Arc::new(config.finish().unwrap())))
}

async fn hand_middleware(
    State(keys): State<Arc<HashMap<String, Arc<HandContext>>>>,
    mut req: Request,
    next: Next,
) -> Response {
    let key = req.headers().get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    match key.and_then(|k| keys.get(k)) {
        Some(ctx) => {
            req.extensions_mut().insert(ctx.clone());
            next.run(req).await
        }
        None => StatusCode::UNAUTHORIZED.into_response(),
    }
}

/// A loopback Oneloop that knows every bench key (cold misses and warm-up only).
pub(crate) async fn fake_oneloop() -> SocketAddr {
    async fn verify(Json(req): Json<Value>) -> Json<Value> {
        let k = req["key"].as_str().unwrap_or_default();
        let i = (0..KEYS).find(|&i| key(i) == k);
        let scopes: Vec<Value> =
            i.map_or(vec![], |i| facts(i).scopes.iter().map(|s| serde_json::to_value(s).unwrap()).collect());
        Json(json!({
            "apiKeyId": i.map_or(String::new(), |i| facts(i).id), "expiresAt": null, "requestedScopes": [],
            "status": if i.is_some() { "VALID" } else { "INVALID" }, "billing": null, "externalMeterId": null,
            "customerId": i.map(|i| format!("cus_{i:06}")), "metadata": {"plan": "pro"}, "scopes": scopes,
        }))
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().route("/api/v1/api-key/verify", post(verify));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

pub(crate) fn oneloop(addr: SocketAddr) -> OneloopVerifier {
    // Generous: under valgrind a loopback call can take a second, and warm-up is not what is measured.
    let timeout = std::time::Duration::from_secs(30);
    OneloopVerifier::builder("ws_bench").base_url(format!("http://{addr}")).timeout(timeout).build().unwrap()
}

fn floor_work(builder: keygate::ApiKeyLayerBuilder) -> keygate::ApiKeyLayerBuilder {
    builder.sources([keygate::KeySource::Bearer]).hide_credentials(false)
}

fn limited(builder: keygate::ApiKeyLayerBuilder) -> keygate::ApiKeyLayerBuilder {
    builder.rate_limit(RateLimit::new("default", RateLimit::MAX_LIMIT, std::time::Duration::from_secs(3600)).unwrap())
}

/// Every variant, by name, with the same router and handler.
pub(crate) async fn variants(oneloop_addr: SocketAddr) -> Vec<(&'static str, Router)> {
    let local = local_verifier().await;
    let remote = oneloop(oneloop_addr);
    let gate = |b: keygate::ApiKeyLayerBuilder| b.routes(routes()).build().unwrap();
    let off = |b: keygate::ApiKeyLayerBuilder| b.rate_limit_headers(HeaderStyle::Off);
    #[cfg_attr(not(feature = "redis"), allow(unused_mut))]
    let mut variants = vec![
        ("bare", router()),
        // Deprecated upstream as too basic for real use: exactly why it is the floor here.
        #[allow(deprecated)]
        ("static_bearer", router().layer(ValidateRequestHeaderLayer::bearer(&key(0)))),
        ("hand_hashmap", router().layer(from_fn_with_state(Arc::new(hand_map()), hand_middleware))),
        ("hand_service", router().layer(HandLayer(Arc::new(hand_map())))),
        ("tower_governor", governed(router())),
        ("keygate_local", router().layer(gate(ApiKeyLayer::builder(local.clone())))),
        // The floor's work and no more: `Bearer` only, the key left in the request.
        ("keygate_local_floor_work", router().layer(gate(floor_work(ApiKeyLayer::builder(local.clone()))))),
        ("keygate_local_limit", router().layer(gate(off(limited(ApiKeyLayer::builder(local.clone())))))),
        ("keygate_local_limit_headers", router().layer(gate(limited(ApiKeyLayer::builder(local.clone()))))),
        ("keygate_oneloop_warm", router().layer(gate(ApiKeyLayer::builder(remote.clone())))),
        ("keygate_oneloop_warm_limit_headers", router().layer(gate(limited(ApiKeyLayer::builder(remote))))),
        (
            "keygate_reject_forged",
            router().layer(gate(ApiKeyLayer::builder(local_verifier().await).key_format(format()))),
        ),
        (
            "keygate_reject_forged_keyed",
            router().layer(gate(ApiKeyLayer::builder(local_verifier().await).key_format(keyed_format()))),
        ),
    ];
    #[cfg(feature = "redis")]
    variants.extend(redis_variants(&local));
    variants
}

/// With `REDIS_URL` set: the same limit as `keygate_local_limit`, decided by the Redis limiter.
/// Counters live under a prefix of this process's own and expire with their one-minute window.
#[cfg(feature = "redis")]
fn redis_variants(local: &LocalVerifier) -> Vec<(&'static str, Router)> {
    let Ok(url) = std::env::var("REDIS_URL") else { return vec![] };
    let conn = keygate::RedisConnection::open(&url).expect("REDIS_URL opens");
    let prefix = format!("kgbench:{}", std::process::id());
    let limit = RateLimit::new("default", RateLimit::MAX_LIMIT, std::time::Duration::from_secs(60)).unwrap();
    let gate = |limiter: keygate::limit::RedisLimiter| {
        let builder = ApiKeyLayer::builder(local.clone()).routes(routes()).rate_limit(limit.clone());
        router().layer(builder.rate_limit_headers(HeaderStyle::Off).limiter(limiter).build().unwrap())
    };
    // Generous, as for Oneloop: under valgrind a round trip can take far longer than 50 ms.
    let limiter =
        || keygate::limit::RedisLimiter::new(conn.clone(), &prefix).timeout(std::time::Duration::from_secs(5));
    let (exact, local_first) = (limiter(), limiter().local_first(100));
    vec![("keygate_redis_limit", gate(exact)), ("keygate_redis_limit_local_first", gate(local_first))]
}

fn format() -> keygate::KeyFormat {
    keygate::KeyFormat::checksummed("kb_").unwrap()
}

fn keyed_format() -> keygate::KeyFormat {
    let secret = keygate::KeySecret::new(b"bench secret, sixteen bytes or more").unwrap();
    keygate::KeyFormat::keyed("kb_", [secret]).unwrap()
}

/// Which keys a variant is called with: all 1 000, the one static token, or forged keys (right
/// prefix and length, wrong checksum or tag) for the rejection variants.
pub(crate) fn keys_for(variant: &str) -> Vec<String> {
    match variant {
        "static_bearer" => vec![key(0)],
        "keygate_reject_forged" => (0..KEYS).map(key).filter(|k| !format().accepts(k)).collect(),
        // Right prefix and length for the keyed format, a tag made without the secret.
        "keygate_reject_forged_keyed" => (0..KEYS).map(|i| format!("kb_{i:0>33}")).collect(),
        _ => (0..KEYS).map(key).collect(),
    }
}

/// The status a variant answers its keys with.
pub(crate) fn expected_status(variant: &str) -> u16 {
    if variant.starts_with("keygate_reject_forged") {
        401
    } else {
        200
    }
}
