//! The remote verifier: Oneloop's `POST /api/v1/api-key/verify` and `record-usage` (feature
//! `oneloop`).
//!
//! Two modes:
//! - [`Mode::Cached`] (the default): one verify per key per TTL, asking for no scope, so the answer
//!   (the key's status, scopes, expiry, metadata, billing meter) serves every route; scopes are
//!   decided per request from it, and rate and usage limits are enforced locally. A known key costs a
//!   cache lookup. Oneloop's own per-request rate limits and metering are not used.
//! - [`Mode::PerRequest`]: every request calls verify with the route's scope, `billing` and
//!   `rateLimitConfig`, so Oneloop meters and limits exactly, at the cost of a round trip on every
//!   request and of Oneloop's availability becoming yours.

mod batcher;

pub use batcher::{BatchConfig, DeliveryPolicy, UsageBatcher, UsageReport};

mod client;
mod wire;

use crate::boxed::BoxFuture;
use crate::breaker::{Breaker, BreakerConfig};
use crate::build_error::BuildError;
use crate::cache::{CacheConfig, CachedVerifier};
use crate::key::{ApiKey, PresentedKey};
use crate::verify::{Verification, Verifier, VerifyError, VerifyRequest};
pub(crate) use client::Delivery;
use client::{CallError, Client};
use std::fmt;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use wire::{BillingBody, RateLimitBody, RecordUsageBody, VerifyBody};

/// The production server in Oneloop's spec.
pub const DEFAULT_BASE_URL: &str = "https://prod.oneloop.ai";
/// The default time allowed for one call to Oneloop's verify.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(300);
/// The default time allowed for one call to Oneloop's record-usage: it is off the request path, and
/// a call that times out may have been recorded, so it gets room to answer.
pub const DEFAULT_USAGE_TIMEOUT: Duration = Duration::from_secs(5);

#[doc = include_str!("../../docs/mode.md")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Mode {
    /// Verify each key once per TTL and decide scopes and limits locally (the default).
    #[default]
    Cached,
    /// Verify every request with its scope, billing and rate limit.
    PerRequest,
}

#[doc = include_str!("../../docs/oneloop_verifier.md")]
#[derive(Clone)]
pub struct OneloopVerifier {
    upstream: Upstream,
    cache: Option<CachedVerifier<Upstream>>,
}

impl OneloopVerifier {
    /// A builder, with the workspace token Oneloop gave you.
    pub fn builder(workspace_token: impl Into<String>) -> OneloopBuilder {
        OneloopBuilder {
            token: workspace_token.into(),
            base_url: DEFAULT_BASE_URL.into(),
            timeout: DEFAULT_TIMEOUT,
            usage_timeout: DEFAULT_USAGE_TIMEOUT,
            allow_http: false,
            client: None,
            mode: Mode::Cached,
            cache: CacheConfig::default(),
            breaker: BreakerConfig::default(),
        }
    }

    /// Forgets the cached answer for `key` (revocation); a no-op in per-request mode.
    pub fn invalidate(&self, key: &str) {
        if let Some(cache) = &self.cache {
            cache.invalidate(key);
        }
    }

    /// Forgets every cached answer.
    pub fn invalidate_all(&self) {
        if let Some(cache) = &self.cache {
            cache.invalidate_all();
        }
    }

    /// The cache, in cached mode.
    #[must_use]
    pub fn cache(&self) -> Option<&CachedVerifier<impl Verifier>> {
        self.cache.as_ref()
    }

    /// Whether the circuit breaker is open (Oneloop is being left alone).
    #[must_use]
    pub fn circuit_open(&self) -> bool {
        self.upstream.0.breaker.is_open()
    }

    /// Records `usage` of `usage_name` (or the default usage) for `key`
    /// (`POST /api/v1/api-key/record-usage`).
    ///
    /// # Errors
    /// Any answer but a `2xx`. The call has no idempotency key: after a timeout or a `5xx` the usage
    /// may have been recorded, so sending it again may count it twice (the
    /// [`UsageBatcher`] does not, by default).
    pub async fn record_usage(&self, key: &ApiKey, usage: u64, usage_name: Option<&str>) -> Result<(), VerifyError> {
        match self.deliver_usage(key, usage, usage_name).await {
            Delivery::Acknowledged => Ok(()),
            Delivery::NotDelivered(m) | Delivery::Rejected(_, m) | Delivery::Uncertain(m) => Err(VerifyError::new(m)),
        }
    }

    pub(crate) async fn deliver_usage(&self, key: &ApiKey, usage: u64, usage_name: Option<&str>) -> Delivery {
        let billing = BillingBody { usage: usage.to_string(), usage_name };
        let body = RecordUsageBody { key: key.expose_secret(), billing };
        self.upstream.0.client.record_usage(&body).await
    }
}

impl Verifier for OneloopVerifier {
    fn verify_now(&self, key: &PresentedKey<'_>) -> Option<Verification> {
        self.cache.as_ref()?.verify_now(key)
    }

    fn verify(&self, request: VerifyRequest) -> BoxFuture<'static, Result<Verification, VerifyError>> {
        match &self.cache {
            Some(cache) => cache.verify(request),
            None => self.upstream.verify(request),
        }
    }
}

impl fmt::Debug for OneloopVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let u = &self.upstream.0;
        f.debug_struct("OneloopVerifier")
            .field("base_url", &u.client.base_url)
            .field("mode", &u.mode)
            .field("timeout", &u.client.timeout)
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

#[doc = include_str!("../../docs/oneloop_builder.md")]
pub struct OneloopBuilder {
    token: String,
    base_url: String,
    timeout: Duration,
    usage_timeout: Duration,
    allow_http: bool,
    client: Option<reqwest::Client>,
    mode: Mode,
    cache: CacheConfig,
    breaker: BreakerConfig,
}

impl OneloopBuilder {
    /// The server (default [`DEFAULT_BASE_URL`]): for tests and self-hosted peers. It must be
    /// `https`, or plain `http` to a loopback address (`127.0.0.0/8`, `[::1]`, `localhost`), or plain
    /// `http` anywhere with [`allow_http`](Self::allow_http): every call carries a user's key.
    #[must_use]
    pub fn base_url(mut self, url: impl Into<String>) -> Self {
        self.base_url = url.into();
        self
    }

    /// Allow a plain-`http` base URL that is not loopback (default off): your users' keys then cross
    /// the network in clear text. For a sidecar on a private network you trust.
    #[must_use]
    pub fn allow_http(mut self, allow: bool) -> Self {
        self.allow_http = allow;
        self
    }

    /// The time allowed for one verify call (default 300 ms).
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The time allowed for one record-usage call (default [`DEFAULT_USAGE_TIMEOUT`], 5 s). It is
    /// off the request path, and a call that times out may have been recorded (and is then not
    /// sent again by default), so it should be generous.
    #[must_use]
    pub fn usage_timeout(mut self, timeout: Duration) -> Self {
        self.usage_timeout = timeout;
        self
    }

    /// Your own `reqwest::Client` (proxies, pools, TLS roots). Build it with
    /// `.redirect(reqwest::redirect::Policy::none())`: a client that follows redirects would
    /// re-send your users' keys to wherever a redirect points.
    #[must_use]
    pub fn client(mut self, client: reqwest::Client) -> Self {
        self.client = Some(client);
        self
    }

    /// Cached (default) or per-request; see the [module docs](self).
    #[must_use]
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// The cache's settings, in cached mode.
    #[must_use]
    pub fn cache(mut self, config: CacheConfig) -> Self {
        self.cache = config;
        self
    }

    /// The circuit breaker's settings.
    #[must_use]
    pub fn breaker(mut self, config: BreakerConfig) -> Self {
        self.breaker = config;
        self
    }

    /// Checks the settings and builds the verifier.
    ///
    /// # Errors
    /// [`BuildError::Verifier`] for a token that is empty or not visible ASCII, a base URL that is not
    /// an `http(s)` URL with a host, plain `http` to a host other than loopback without `allow_http`,
    /// a timeout of zero, or an HTTP client that cannot be built.
    pub fn build(self) -> Result<OneloopVerifier, BuildError> {
        let bad = |m: &str| Err(BuildError::Verifier(m.into()));
        if self.token.is_empty() || !self.token.bytes().all(|b| b.is_ascii_graphic()) {
            return bad("the Oneloop workspace token must be non-empty visible ASCII");
        }
        let url = match reqwest::Url::parse(&self.base_url) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => url,
            _ => return bad("the Oneloop base URL must be an http(s) URL"),
        };
        let host = url.host_str().unwrap_or_default();
        let loopback = host.eq_ignore_ascii_case("localhost")
            || host.trim_matches(['[', ']']).parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
        if url.scheme() == "http" && !loopback && !self.allow_http {
            return bad("the Oneloop base URL must be https (plain http only to loopback, or with allow_http(true))");
        }
        if self.timeout.is_zero() || self.usage_timeout.is_zero() {
            return bad("the Oneloop timeouts must be above zero");
        }
        let http = match self.client {
            Some(client) => client,
            None => reqwest::Client::builder()
                .pool_idle_timeout(Duration::from_secs(60))
                // A redirect would carry the user's key to another origin: a 3xx is a failed call.
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .map_err(|e| BuildError::Verifier(format!("HTTP client: {e}")))?,
        };
        let client = Client {
            http,
            base_url: url.as_str().trim_end_matches('/').to_owned(),
            token: self.token,
            timeout: self.timeout,
            usage_timeout: self.usage_timeout,
            warned_token: AtomicBool::new(false),
        };
        let upstream =
            Upstream(Arc::new(UpstreamInner { client, breaker: Breaker::new(self.breaker), mode: self.mode }));
        let cache = (self.mode == Mode::Cached).then(|| CachedVerifier::new(upstream.clone(), self.cache));
        Ok(OneloopVerifier { upstream, cache })
    }
}

impl fmt::Debug for OneloopBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OneloopBuilder")
            .field("base_url", &self.base_url)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

/// The uncached calls, behind the circuit breaker.
#[derive(Clone)]
struct Upstream(Arc<UpstreamInner>);

struct UpstreamInner {
    client: Client,
    breaker: Breaker,
    mode: Mode,
}

impl Verifier for Upstream {
    fn verify(&self, request: VerifyRequest) -> BoxFuture<'static, Result<Verification, VerifyError>> {
        let this = self.0.clone();
        Box::pin(async move {
            let permit = this
                .breaker
                .permit()
                .map_err(|wait| VerifyError::new("Oneloop circuit open").with_retry_after(wait))?;
            // Cached mode asks what the key is, for every route; per-request mode asks for this one.
            let per_request = this.mode == Mode::PerRequest;
            let body = VerifyBody {
                key: request.key.expose_secret(),
                requested_scopes: request.scope.iter().filter(|_| per_request).map(|s| s.to_scope()).collect(),
                route: request.route.as_deref().filter(|_| per_request),
                billing: request
                    .usage
                    .as_ref()
                    .filter(|_| per_request)
                    .map(|u| BillingBody { usage: u.amount.to_string(), usage_name: u.name.as_deref() }),
                rate_limit_config: request
                    .rate_limit
                    .as_ref()
                    .filter(|_| per_request)
                    .map(|l| RateLimitBody { id: l.name(), limit: l.limit() }),
            };
            let result = this.client.verify(&body).await.and_then(|response| {
                let mut verification =
                    response.into_verification().map_err(|m| CallError::OneCall(format!("Oneloop verify: {m}")))?;
                // Oneloop billed the usage and counted the rate limit it was sent.
                verification.counted = per_request;
                Ok(verification)
            });
            match result {
                Ok(verification) => {
                    permit.success();
                    Ok(verification)
                }
                Err(CallError::Down(message)) => {
                    permit.failure();
                    Err(VerifyError::new(message))
                }
                Err(CallError::OneCall(message)) => {
                    permit.success();
                    Err(VerifyError::new(message))
                }
            }
        })
    }
}
