//! [`ApiKeyLayer`] and its builder.

use crate::extract::{Extractor, KeySource};
use crate::gate::Gate;
use crate::key::KeyFormat;
use crate::limit::{HeaderStyle, Limiter, MemoryLimiter, RateLimit};
use crate::outage::Outage;
use crate::reject::{ProblemJson, Responder};
use crate::scope::ScopeMap;
use crate::service::ApiKeyService;
use crate::usage::{Meter, UsageSink};
use crate::verify::Verifier;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tower_layer::Layer;

/// The longest key accepted by default, in bytes.
pub const DEFAULT_MAX_KEY_LEN: usize = 256;
/// The most a key may be configured to be, in bytes.
pub const MAX_MAX_KEY_LEN: usize = 4096;
/// The longest `Retry-After` a `503` may ask for: a day.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// Gates a service by API key. Cloning it shares one verifier, one cache and one set of counters.
///
/// ```
/// use axum::{routing::get, Router};
/// use keygate::{ApiKeyLayer, LocalVerifier, ScopeMap};
///
/// let verifier = LocalVerifier::in_memory();
/// let layer = ApiKeyLayer::builder(verifier.clone())
///     .routes(ScopeMap::new().public("/health").route("/v1/items", "items"))
///     .build()
///     .expect("valid configuration");
/// let app: Router = Router::new()
///     .route("/health", get(|| async { "ok" }))
///     .route("/v1/items", get(|| async { "[]" }))
///     .layer(layer);
/// # let _ = app;
/// ```
#[derive(Clone)]
pub struct ApiKeyLayer {
    gate: Arc<Gate>,
}

impl ApiKeyLayer {
    /// A layer with the defaults: keys from `Authorization: Bearer` or `X-API-Key`, at most 256
    /// bytes, any format, no route table (any valid key passes), credentials hidden from the inner
    /// service, problem+json rejections.
    pub fn new(verifier: impl Verifier) -> Self {
        Self::builder(verifier).build().expect("the default configuration is valid")
    }

    /// A builder, to configure sources, routes, format and responses.
    pub fn builder(verifier: impl Verifier) -> ApiKeyLayerBuilder {
        ApiKeyLayerBuilder {
            verifier: Arc::new(verifier),
            sources: KeySource::defaults(),
            max_key_len: DEFAULT_MAX_KEY_LEN,
            format: KeyFormat::Any,
            routes: ScopeMap::new(),
            hide_credentials: true,
            optional: false,
            allow_preflight: false,
            responder: Arc::new(ProblemJson),
            unavailable_retry_after: Duration::from_secs(1),
            fail_open: false,
            limiter: None,
            limits: Vec::new(),
            metadata_limit: None,
            header_style: HeaderStyle::default(),
            sink: None,
            usage_payment_required: false,
        }
    }

    /// How many requests were let through unverified because of [`fail_open`].
    ///
    /// [`fail_open`]: ApiKeyLayerBuilder::fail_open
    pub fn fail_open_count(&self) -> u64 {
        self.gate.fail_open_count.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl<S> Layer<S> for ApiKeyLayer {
    type Service = ApiKeyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ApiKeyService::new(inner, self.gate.clone())
    }
}

impl fmt::Debug for ApiKeyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = &self.gate;
        f.debug_struct("ApiKeyLayer")
            .field("sources", &g.extractor.sources)
            .field("max_key_len", &g.extractor.max_key_len)
            .field("format", &g.format)
            .field("routes", &g.routes)
            .field("hide_credentials", &g.hide_credentials)
            .field("optional", &g.optional)
            .field("allow_preflight", &g.allow_preflight)
            .field("fail_open", &g.fail_open)
            .finish_non_exhaustive()
    }
}

/// Configures an [`ApiKeyLayer`]. Every setting has a default; [`build`](Self::build) checks them
/// together and says what is wrong.
pub struct ApiKeyLayerBuilder {
    verifier: Arc<dyn Verifier>,
    sources: Vec<KeySource>,
    max_key_len: usize,
    format: KeyFormat,
    routes: ScopeMap,
    hide_credentials: bool,
    optional: bool,
    allow_preflight: bool,
    responder: Arc<dyn Responder>,
    unavailable_retry_after: Duration,
    fail_open: bool,
    limiter: Option<Arc<dyn Limiter>>,
    limits: Vec<RateLimit>,
    metadata_limit: Option<String>,
    header_style: HeaderStyle,
    sink: Option<Arc<dyn UsageSink>>,
    usage_payment_required: bool,
}

impl ApiKeyLayerBuilder {
    /// Where keys are looked for, replacing the defaults (`Bearer`, `X-API-Key`). A request with a
    /// key in more than one of them is refused with `400`.
    pub fn sources(mut self, sources: impl IntoIterator<Item = KeySource>) -> Self {
        self.sources = sources.into_iter().collect();
        self
    }

    /// The longest key accepted, in bytes (default 256, at most 4096). Longer keys are refused
    /// before any hashing or lookup.
    pub fn max_key_len(mut self, bytes: usize) -> Self {
        self.max_key_len = bytes;
        self
    }

    /// The shape keys must have; others are refused as invalid before any lookup (default:
    /// [`KeyFormat::Any`]).
    pub fn key_format(mut self, format: KeyFormat) -> Self {
        self.format = format;
        self
    }

    /// The route table: templates to representations, public routes, and the policy for routes
    /// not in it.
    pub fn routes(mut self, routes: ScopeMap) -> Self {
        self.routes = routes;
        self
    }

    /// Whether the key's header (or query parameter) is removed before the inner service sees the
    /// request (default `true`), like Kong's `hide_credentials`. Handlers get a
    /// [`VerifiedKey`](crate::VerifiedKey) instead.
    pub fn hide_credentials(mut self, hide: bool) -> Self {
        self.hide_credentials = hide;
        self
    }

    /// Optional mode (default off): a request with no key passes without a
    /// [`VerifiedKey`](crate::VerifiedKey), whatever its route; a request with a key is still
    /// verified and refused if the key is bad. Handlers decide with `Option<VerifiedKey>`.
    pub fn optional(mut self, optional: bool) -> Self {
        self.optional = optional;
        self
    }

    /// Whether CORS preflights (`OPTIONS` with `Access-Control-Request-Method`) pass without a key
    /// (default `false`). Turn it on when a CORS layer answers them inside this one.
    pub fn allow_preflight(mut self, allow: bool) -> Self {
        self.allow_preflight = allow;
        self
    }

    /// What rejections look like (default [`ProblemJson`]).
    pub fn responder(mut self, responder: impl Responder) -> Self {
        self.responder = Arc::new(responder);
        self
    }

    /// The `Retry-After` of a `503` when the verifier cannot answer (default 1 s; zero is sent as
    /// 1 s; more than a day is refused by [`build`](Self::build)).
    pub fn unavailable_retry_after(mut self, after: Duration) -> Self {
        self.unavailable_retry_after = after;
        self
    }

    /// Fail open (default off): when the verifier cannot answer and has no safe cached answer, let
    /// the request through *unverified* instead of answering `503`. Such requests carry a
    /// [`VerifiedKey`](crate::VerifiedKey) whose [`is_fail_open`](crate::VerifiedKey::is_fail_open)
    /// is true (and no id or scopes), and are counted by [`ApiKeyLayer::fail_open_count`]. Only for
    /// APIs where availability matters more than access control.
    pub fn fail_open(mut self, fail_open: bool) -> Self {
        self.fail_open = fail_open;
        self
    }

    /// A rate limit on every gated request, per key (on top of route and key limits).
    pub fn rate_limit(mut self, limit: RateLimit) -> Self {
        self.limits.push(limit);
        self
    }

    /// Where rate-limit and usage counters live (default: a [`MemoryLimiter`] per layer; a
    /// `RedisLimiter` shares them between instances).
    pub fn limiter(mut self, limiter: impl Limiter) -> Self {
        self.limiter = Some(Arc::new(limiter));
        self
    }

    /// Reads a key's own rate limit from this metadata field, written `100/60s`, `100/s`, `100/min`
    /// or `100/h`. Unreadable values are ignored.
    pub fn rate_limit_from_metadata(mut self, field: &str) -> Self {
        self.metadata_limit = Some(field.to_owned());
        self
    }

    /// Which rate-limit headers responses carry (default: the IETF `RateLimit` and
    /// `RateLimit-Policy`).
    pub fn rate_limit_headers(mut self, style: HeaderStyle) -> Self {
        self.header_style = style;
        self
    }

    /// Where usage is reported, such as a Oneloop [`UsageBatcher`](crate::usage::UsageBatcher).
    pub fn usage_sink(mut self, sink: impl UsageSink) -> Self {
        self.sink = Some(Arc::new(sink));
        self
    }

    /// Answer a spent usage allowance with `402 Payment Required` instead of `429`.
    pub fn usage_limit_payment_required(mut self, yes: bool) -> Self {
        self.usage_payment_required = yes;
        self
    }

    /// Checks the configuration and builds the layer.
    pub fn build(mut self) -> Result<ApiKeyLayer, BuildError> {
        if let Some(error) = self.routes.take_error() {
            return Err(error);
        }
        if self.sources.is_empty() {
            return Err(BuildError::NoKeySource);
        }
        for (i, source) in self.sources.iter().enumerate() {
            if self.sources[..i].contains(source) {
                return Err(BuildError::DuplicateKeySource(format!("{source:?}")));
            }
            if let KeySource::Query(name) = source {
                if name.is_empty() || name.contains(['&', '=', '#', '?']) {
                    return Err(BuildError::InvalidQueryParameter(name.clone()));
                }
            }
        }
        if !(1..=MAX_MAX_KEY_LEN).contains(&self.max_key_len) {
            return Err(BuildError::MaxKeyLen(self.max_key_len));
        }
        if self.unavailable_retry_after > MAX_RETRY_AFTER {
            return Err(BuildError::RetryAfter(self.unavailable_retry_after));
        }
        let gate = Gate {
            verifier: self.verifier,
            extractor: Extractor { sources: self.sources.into(), max_key_len: self.max_key_len },
            format: self.format,
            routes: self.routes,
            hide_credentials: self.hide_credentials,
            optional: self.optional,
            allow_preflight: self.allow_preflight,
            responder: self.responder,
            unavailable_retry_after: self.unavailable_retry_after,
            fail_open: self.fail_open,
            fail_open_count: Default::default(),
            limits: self.limits,
            metadata_limit: self.metadata_limit,
            header_style: self.header_style,
            meter: Arc::new(Meter {
                limiter: self.limiter.unwrap_or_else(|| Arc::new(MemoryLimiter::new())),
                sink: self.sink,
            }),
            usage_payment_required: self.usage_payment_required,
            verifier_outage: Outage::new(
                "the verifier",
                if self.fail_open { "failing OPEN: requests pass unverified" } else { "refusing with 503" },
            ),
            limiter_outage: Outage::new("the rate limiter", "refusing with 503"),
        };
        Ok(ApiKeyLayer { gate: Arc::new(gate) })
    }
}

impl fmt::Debug for ApiKeyLayerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeyLayerBuilder")
            .field("sources", &self.sources)
            .field("routes", &self.routes)
            .finish_non_exhaustive()
    }
}

/// The layer's configuration is not valid.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BuildError {
    /// No key source was configured.
    NoKeySource,
    /// The same key source was configured twice.
    DuplicateKeySource(String),
    /// A query-parameter source has an empty or unusable name.
    InvalidQueryParameter(String),
    /// The key length cap is out of range.
    MaxKeyLen(usize),
    /// `unavailable_retry_after` is longer than a day.
    RetryAfter(Duration),
    /// A verifier's settings are not valid.
    Verifier(String),
    /// A route template could not be added to the table.
    Route {
        /// The template.
        template: String,
        /// Why.
        reason: String,
    },
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoKeySource => {
                f.write_str("no key source: configure at least one of Bearer, a header or a query parameter")
            }
            Self::DuplicateKeySource(s) => write!(f, "key source {s} is configured twice"),
            Self::InvalidQueryParameter(name) => {
                write!(f, "query parameter name {name:?} must be non-empty and free of `&=#?`")
            }
            Self::MaxKeyLen(n) => write!(f, "max_key_len is {n}; it must be between 1 and {MAX_MAX_KEY_LEN} bytes"),
            Self::RetryAfter(d) => write!(f, "unavailable_retry_after is {d:?}; it must be at most a day"),
            Self::Route { template, reason } => write!(f, "route {template:?}: {reason}"),
            Self::Verifier(reason) => f.write_str(reason),
        }
    }
}

impl std::error::Error for BuildError {}
