//! What a handler learns about the caller: [`VerifiedKey`], put in the request's extensions by the
//! gate, and an axum extractor for it (feature `axum`).

use crate::limit::{most_restrictive, LimitState};
use crate::scope::Scope;
use crate::usage::UsageHandle;
use crate::verify::{KeyFacts, Metadata};
use std::sync::Arc;
use std::time::SystemTime;

/// The verified key of a request: its id, scopes, metadata, customer and expiry. Never the key.
///
/// With the `axum` feature it is an extractor: `VerifiedKey` refuses with `401` when the request
/// has none, `Option<VerifiedKey>` gives `None` (for routes in optional mode).
///
/// ```
/// use axum::{routing::get, Router};
/// use keygate::VerifiedKey;
///
/// async fn whoami(key: VerifiedKey) -> String {
///     format!("key {} of customer {:?}", key.id(), key.customer_id())
/// }
/// async fn maybe(key: Option<VerifiedKey>) -> &'static str {
///     if key.is_some() { "hello, member" } else { "hello, guest" }
/// }
/// let app: Router = Router::new().route("/whoami", get(whoami)).route("/hello", get(maybe));
/// # let _ = app;
/// ```
#[derive(Debug, Clone)]
pub struct VerifiedKey {
    facts: Arc<KeyFacts>,
    stale: bool,
    fail_open: bool,
    rate_limits: Vec<LimitState>,
    usage: UsageHandle,
}

impl VerifiedKey {
    pub(crate) fn new(facts: Arc<KeyFacts>, stale: bool) -> Self {
        Self { facts, stale, fail_open: false, rate_limits: Vec::new(), usage: UsageHandle::none() }
    }

    /// A request let through unverified because the verifier failed and the layer fails open.
    pub(crate) fn fail_open() -> Self {
        Self { fail_open: true, ..Self::new(Arc::default(), false) }
    }

    pub(crate) fn set_usage(&mut self, usage: UsageHandle) {
        self.usage = usage;
    }

    pub(crate) fn set_rate_limits(&mut self, states: Vec<LimitState>) {
        self.rate_limits = states;
    }

    /// The state of every rate limit this request passed.
    pub fn rate_limits(&self) -> &[LimitState] {
        &self.rate_limits
    }

    /// The rate limit closest to refusing (fewest requests left), if any applied.
    pub fn rate_limit(&self) -> Option<&LimitState> {
        most_restrictive(&self.rate_limits)
    }

    /// Adds usage to this key after the fact; see [`UsageHandle`].
    pub fn usage(&self) -> &UsageHandle {
        &self.usage
    }

    /// Whether the request was let in *without* verification, because the verifier could not
    /// answer and the layer was configured to fail open. Such a key has no id, scopes or metadata.
    pub fn is_fail_open(&self) -> bool {
        self.fail_open
    }

    /// Whether the answer was served stale from the cache while the verifier failed.
    pub fn is_stale(&self) -> bool {
        self.stale
    }

    /// The key's id.
    pub fn id(&self) -> &str {
        &self.facts.id
    }

    /// The key's name, if it has one.
    pub fn name(&self) -> Option<&str> {
        self.facts.name.as_deref()
    }

    /// The scopes the key holds.
    pub fn scopes(&self) -> &[Scope] {
        &self.facts.scopes
    }

    /// The key's metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.facts.metadata
    }

    /// The customer the key belongs to.
    pub fn customer_id(&self) -> Option<&str> {
        self.facts.customer_id.as_deref()
    }

    /// When the key expires, if ever.
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.facts.expires_at
    }

    /// All the facts, shared with the cache.
    pub fn facts(&self) -> &Arc<KeyFacts> {
        &self.facts
    }
}

#[cfg(feature = "axum")]
mod extractor {
    use super::VerifiedKey;
    use crate::reject::Rejection;
    use axum::extract::{FromRequestParts, OptionalFromRequestParts};
    use http::request::Parts;

    impl<S: Send + Sync> FromRequestParts<S> for VerifiedKey {
        type Rejection = Rejection;

        async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Rejection> {
            // No context means no gate ran or optional mode let a keyless request in: fail closed.
            parts.extensions.get::<VerifiedKey>().cloned().ok_or(Rejection::MissingKey)
        }
    }

    impl<S: Send + Sync> OptionalFromRequestParts<S> for VerifiedKey {
        type Rejection = std::convert::Infallible;

        async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Option<Self>, Self::Rejection> {
            Ok(parts.extensions.get::<VerifiedKey>().cloned())
        }
    }
}
