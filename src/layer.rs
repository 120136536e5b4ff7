//! [`ApiKeyLayer`] and its builder.

use crate::build_error::{BuildError, KEY_LEN_CEILING};
use crate::extract::{Extractor, KeySource};
use crate::gate::{Decide, Enforce, Gate, Intake, Refusals, Unverifiable};
use crate::key::KeyFormat;
use crate::limit::{HeaderStyle, Limiter, MemoryLimiter, RateLimit};
use crate::outage::Outage;
use crate::reject::{ProblemJson, Responder};
use crate::route::{RouteEntry, RouteTable};
use crate::service::ApiKeyService;
use crate::usage::{Metering, UsageSink};
use crate::verify::Verifier;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tower_layer::Layer;

/// The longest key accepted by default, in bytes.
pub const DEFAULT_MAX_KEY_LEN: usize = 256;
/// The longest `Retry-After` a `503` may ask for: a day.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

#[doc = include_str!("../docs/api_key_layer.md")]
#[derive(Clone)]
pub struct ApiKeyLayer {
    gate: Arc<Gate>,
}

impl ApiKeyLayer {
    /// A layer with the defaults: keys from `Authorization: Bearer` or `X-API-Key`, at most 256
    /// bytes, any format, no route table (any valid key passes), credentials hidden from the inner
    /// service, problem+json rejections.
    ///
    /// # Panics
    /// Never: the defaults are a valid configuration (tested).
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
            routes: RouteTable::new(),
            hide_credentials: true,
            optional: false,
            allow_preflight: false,
            responder: Arc::new(ProblemJson),
            unavailable_retry_after: Duration::from_secs(1),
            fail_open: false,
            limiter: None,
            limits: Vec::new(),
            identity_limits: Vec::new(),
            metadata_limit: None,
            header_style: HeaderStyle::default(),
            sink: None,
            usage_payment_required: false,
        }
    }

    /// How many requests were let through unverified because of [`fail_open`].
    ///
    /// [`fail_open`]: ApiKeyLayerBuilder::fail_open
    #[must_use]
    pub fn fail_open_count(&self) -> u64 {
        self.gate.unverifiable.fail_open_count.load(std::sync::atomic::Ordering::Relaxed)
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
            .field("sources", &g.intake.extractor.sources)
            .field("max_key_len", &g.intake.extractor.max_key_len)
            .field("format", &g.intake.format)
            .field("routes", &g.routes)
            .field("hide_credentials", &g.intake.hide_credentials)
            .field("optional", &g.intake.optional)
            .field("allow_preflight", &g.intake.allow_preflight)
            .field("fail_open", &g.unverifiable.fail_open)
            .finish_non_exhaustive()
    }
}

#[doc = include_str!("../docs/builder.md")]
pub struct ApiKeyLayerBuilder {
    verifier: Arc<dyn Verifier>,
    sources: Vec<KeySource>,
    max_key_len: usize,
    format: KeyFormat,
    routes: RouteTable,
    hide_credentials: bool,
    optional: bool,
    allow_preflight: bool,
    responder: Arc<dyn Responder>,
    unavailable_retry_after: Duration,
    fail_open: bool,
    limiter: Option<Arc<dyn Limiter>>,
    limits: Vec<RateLimit>,
    identity_limits: Vec<RateLimit>,
    metadata_limit: Option<String>,
    header_style: HeaderStyle,
    sink: Option<Arc<dyn UsageSink>>,
    usage_payment_required: bool,
}

impl ApiKeyLayerBuilder {
    /// Where keys are looked for, replacing the defaults (`Bearer`, `X-API-Key`). A request with a
    /// key in more than one of them is refused with `400`.
    #[must_use]
    pub fn sources(mut self, sources: impl IntoIterator<Item = KeySource>) -> Self {
        self.sources = sources.into_iter().collect();
        self
    }

    /// The longest key accepted, in bytes (default 256, at most 4096). Longer keys are refused
    /// before any hashing or lookup.
    #[must_use]
    pub fn max_key_len(mut self, bytes: usize) -> Self {
        self.max_key_len = bytes;
        self
    }

    /// The shape keys must have; others are refused as invalid before any lookup (default:
    /// [`KeyFormat::Any`]).
    #[must_use]
    pub fn key_format(mut self, format: KeyFormat) -> Self {
        self.format = format;
        self
    }

    /// The route table: templates to representations, public routes, and the policy for routes
    /// not in it.
    #[must_use]
    pub fn routes(mut self, routes: RouteTable) -> Self {
        self.routes = routes;
        self
    }

    /// Whether the key's header (or query parameter) is removed before the inner service sees the
    /// request (default `true`), like Kong's `hide_credentials`. Handlers get a
    /// [`VerifiedKey`](crate::VerifiedKey) instead.
    #[must_use]
    pub fn hide_credentials(mut self, hide: bool) -> Self {
        self.hide_credentials = hide;
        self
    }

    /// Optional mode (default off): a request with no key passes without a
    /// [`VerifiedKey`](crate::VerifiedKey), whatever its route; a request with a key is still
    /// verified and refused if the key is bad. Handlers decide with `Option<VerifiedKey>`.
    #[must_use]
    pub fn optional(mut self, optional: bool) -> Self {
        self.optional = optional;
        self
    }

    /// Whether CORS preflights (`OPTIONS` with `Access-Control-Request-Method`) pass without a key
    /// (default `false`). Turn it on when a CORS layer answers them inside this one.
    #[must_use]
    pub fn allow_preflight(mut self, allow: bool) -> Self {
        self.allow_preflight = allow;
        self
    }

    /// What rejections look like (default [`ProblemJson`]).
    #[must_use]
    pub fn responder(mut self, responder: impl Responder) -> Self {
        self.responder = Arc::new(responder);
        self
    }

    /// The `Retry-After` of a `503` when the verifier cannot answer (default 1 s; zero is sent as
    /// 1 s; more than a day is refused by [`build`](Self::build)).
    #[must_use]
    pub fn unavailable_retry_after(mut self, after: Duration) -> Self {
        self.unavailable_retry_after = after;
        self
    }

    /// Fail open (default off): when the verifier cannot answer and has no safe cached answer, let
    /// the request through *unverified* instead of answering `503`. Such requests carry a
    /// [`VerifiedKey`](crate::VerifiedKey) whose [`is_fail_open`](crate::VerifiedKey::is_fail_open)
    /// is true (and no id or scopes), and are counted by [`ApiKeyLayer::fail_open_count`]. Only for
    /// APIs where availability matters more than access control.
    #[must_use]
    pub fn fail_open(mut self, fail_open: bool) -> Self {
        self.fail_open = fail_open;
        self
    }

    /// A rate limit on every gated request, per key (on top of route and key limits).
    #[must_use]
    pub fn rate_limit(mut self, limit: RateLimit) -> Self {
        self.limits.push(limit);
        self
    }

    /// A rate limit on every gated request, per identity: all keys of one customer
    /// ([`KeyFacts::customer_id`](crate::KeyFacts::customer_id)) count against one counter,
    /// decided together with each key's own limits (all or nothing). A key without a customer is
    /// an identity of its own. Keys may add an identity limit of their own
    /// ([`KeyFacts::identity_quota`](crate::KeyFacts::identity_quota)).
    #[must_use]
    pub fn identity_rate_limit(mut self, limit: RateLimit) -> Self {
        self.identity_limits.push(limit);
        self
    }

    /// Where rate-limit and usage counters live (default: a [`MemoryLimiter`] per layer; a
    /// `RedisLimiter` shares them between instances).
    #[must_use]
    pub fn limiter(mut self, limiter: impl Limiter) -> Self {
        self.limiter = Some(Arc::new(limiter));
        self
    }

    /// Reads a key's own rate limit from this metadata field, written `100/60s`, `100/s`, `100/min`
    /// or `100/h`. Unreadable values are ignored.
    #[must_use]
    pub fn rate_limit_from_metadata(mut self, field: &str) -> Self {
        self.metadata_limit = Some(field.to_owned());
        self
    }

    /// Which rate-limit headers responses carry (default: the IETF `RateLimit` and
    /// `RateLimit-Policy`).
    #[must_use]
    pub fn rate_limit_headers(mut self, style: HeaderStyle) -> Self {
        self.header_style = style;
        self
    }

    /// Where usage is reported, such as a Oneloop `UsageBatcher` (feature `oneloop`).
    #[must_use]
    pub fn usage_sink(mut self, sink: impl UsageSink) -> Self {
        self.sink = Some(Arc::new(sink));
        self
    }

    /// Answer a spent usage allowance with `402 Payment Required` instead of `429`.
    #[must_use]
    pub fn usage_limit_payment_required(mut self, yes: bool) -> Self {
        self.usage_payment_required = yes;
        self
    }

    /// Checks the configuration and builds the layer.
    ///
    /// # Errors
    /// [`BuildError`] naming the first setting that is not valid: no key source or one listed twice,
    /// an unusable query parameter name, `max_key_len` outside 1..=[`KEY_LEN_CEILING`](crate::KEY_LEN_CEILING),
    /// `unavailable_retry_after` over a day, or a route template the table refused.
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
        if !(1..=KEY_LEN_CEILING).contains(&self.max_key_len) {
            return Err(BuildError::MaxKeyLen(self.max_key_len));
        }
        if self.unavailable_retry_after > MAX_RETRY_AFTER {
            return Err(BuildError::RetryAfter(self.unavailable_retry_after));
        }
        let fail_open = self.fail_open;
        let refusals = Refusals {
            usage_payment_required: self.usage_payment_required,
            unavailable_retry_after: self.unavailable_retry_after,
        };
        let gate = Gate {
            intake: Intake {
                extractor: Extractor { sources: self.sources.into(), max_key_len: self.max_key_len },
                format: self.format,
                hide_credentials: self.hide_credentials,
                optional: self.optional,
                allow_preflight: self.allow_preflight,
            },
            routes: self.routes.with_layer_limits(&self.limits),
            verifier: self.verifier,
            unverifiable: Unverifiable {
                fail_open,
                fail_open_count: Default::default(),
                outage: Outage::new(
                    "the verifier",
                    if fail_open { "failing OPEN: requests pass unverified" } else { "refusing with 503" },
                ),
            },
            decide: Decide { refusals, responder: Arc::clone(&self.responder) },
            unrouted: RouteEntry::without_template(),
            enforce: Arc::new(Enforce {
                limits: self.limits,
                metadata_limit: self.metadata_limit,
                metering: Arc::new(Metering {
                    limiter: self.limiter.unwrap_or_else(|| Arc::new(MemoryLimiter::new())),
                    sink: self.sink,
                    identity_limits: self.identity_limits,
                }),
                header_style: self.header_style,
                refusals,
                outage: Outage::new("the rate limiter", "refusing with 503"),
            }),
            responder: self.responder,
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
