//! What a handler learns about the caller: [`VerifiedKey`], put in the request's extensions by the
//! gate, and an axum extractor for it (feature `axum`).

use crate::facts::{KeyFacts, Metadata};
use crate::limit::{most_restrictive, LimitState};
use crate::reject::{Rejection, Responder};
use crate::scope::Scope;
use crate::usage::UsageHandle;
use std::sync::Arc;
use std::time::SystemTime;

#[cfg_attr(feature = "axum", doc = include_str!("../docs/verified_key.md"))]
#[cfg_attr(
    not(feature = "axum"),
    doc = "The verified key of a request: its id, scopes, metadata, customer and expiry. Never the key. With the `axum` feature it is also an extractor."
)]
#[derive(Clone)]
pub struct VerifiedKey {
    facts: Arc<KeyFacts>,
    stale: bool,
    fail_open: bool,
    rate_limits: Vec<LimitState>,
    usage: UsageHandle,
    /// The layer's responder, for refusals made after the gate (`require(...)`).
    responder: Option<Arc<dyn Responder>>,
}

impl std::fmt::Debug for VerifiedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifiedKey")
            .field("facts", &self.facts)
            .field("stale", &self.stale)
            .field("fail_open", &self.fail_open)
            .field("rate_limits", &self.rate_limits)
            .field("usage", &self.usage)
            .finish_non_exhaustive()
    }
}

/// Left in a request's extensions by a gate that let it through without a key (a public route, a
/// preflight, optional mode), so later refusals use the layer's responder and a missing key is
/// told apart from a missing gate.
#[derive(Clone)]
pub(crate) struct Gated(pub(crate) Arc<dyn Responder>);

/// The response to a refusal made after the gate (by `require(...)` or the extractor): the layer's
/// responder when a gate ran, else `500` for a wiring error (no layer covers the route), logged.
pub(crate) fn refuse_after_gate(extensions: &http::Extensions, rejection: &Rejection) -> http::Response<bytes::Bytes> {
    let responder = extensions
        .get::<VerifiedKey>()
        .and_then(|k| k.responder.as_ref())
        .or_else(|| extensions.get::<Gated>().map(|g| &g.0));
    match responder {
        Some(responder) => responder.respond(rejection),
        None => {
            tracing::error!("keygate: a VerifiedKey was asked for on a route no ApiKeyLayer covers; answering 500");
            Rejection::NotGated.to_response()
        }
    }
}

impl VerifiedKey {
    /// A verified key that refuses (in its extractor and `require`) through `responder`.
    pub(crate) fn new(facts: Arc<KeyFacts>, stale: bool, responder: &Arc<dyn Responder>) -> Self {
        let (usage, responder) = (UsageHandle::none(), Some(Arc::clone(responder)));
        Self { facts, stale, fail_open: false, rate_limits: Vec::new(), usage, responder }
    }

    /// A request let through unverified because the verifier failed and the layer fails open.
    pub(crate) fn fail_open(responder: &Arc<dyn Responder>) -> Self {
        Self { fail_open: true, ..Self::new(Arc::default(), false, responder) }
    }

    pub(crate) fn set_usage(&mut self, usage: UsageHandle) {
        self.usage = usage;
    }

    pub(crate) fn set_rate_limits(&mut self, states: Vec<LimitState>) {
        self.rate_limits = states;
    }

    /// The state of every rate limit this request passed.
    #[must_use]
    pub fn rate_limits(&self) -> &[LimitState] {
        &self.rate_limits
    }

    /// The rate limit closest to refusing (fewest requests left), if any applied.
    #[must_use]
    pub fn rate_limit(&self) -> Option<&LimitState> {
        most_restrictive(&self.rate_limits)
    }

    /// Adds usage to this key after the fact; see [`UsageHandle`].
    #[must_use]
    pub fn usage(&self) -> &UsageHandle {
        &self.usage
    }

    /// Whether the request was let in *without* verification, because the verifier could not
    /// answer and the layer was configured to fail open. Such a key has no id, scopes or metadata.
    #[must_use]
    pub fn is_fail_open(&self) -> bool {
        self.fail_open
    }

    /// Whether the answer was served stale from the cache while the verifier failed.
    #[must_use]
    pub fn is_stale(&self) -> bool {
        self.stale
    }

    /// The key's id.
    #[must_use]
    pub fn id(&self) -> &str {
        &self.facts.id
    }

    /// The key's name, if it has one.
    #[must_use]
    pub fn name(&self) -> Option<&str> {
        self.facts.name.as_deref()
    }

    /// The scopes the key holds.
    #[must_use]
    pub fn scopes(&self) -> &[Scope] {
        &self.facts.scopes
    }

    /// The key's metadata.
    #[must_use]
    pub fn metadata(&self) -> &Metadata {
        &self.facts.metadata
    }

    /// The customer the key belongs to.
    #[must_use]
    pub fn customer_id(&self) -> Option<&str> {
        self.facts.customer_id.as_deref()
    }

    /// When the key expires, if ever.
    #[must_use]
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.facts.expires_at
    }

    /// Set when the presented key was rotated away and works only until then: tell its owner
    /// to move to the new key. `None` for a key in its own right.
    #[must_use]
    pub fn grace_ends(&self) -> Option<SystemTime> {
        self.facts.grace_ends
    }

    /// All the facts, shared with the cache.
    #[must_use]
    pub fn facts(&self) -> &Arc<KeyFacts> {
        &self.facts
    }
}

#[cfg(feature = "axum")]
mod extractor {
    use super::{refuse_after_gate, Gated, VerifiedKey};
    use crate::reject::Rejection;
    use axum::extract::{FromRequestParts, OptionalFromRequestParts};
    use axum::response::{IntoResponse, Response};
    use http::request::Parts;

    /// Why the [`VerifiedKey`] extractor refused: the layer's responder's answer to a missing key
    /// (optional mode), or `500` when no [`ApiKeyLayer`](crate::ApiKeyLayer) covers the route.
    #[derive(Debug)]
    pub struct VerifiedKeyRejection(http::Response<bytes::Bytes>);

    impl VerifiedKeyRejection {
        /// The status it answers with.
        pub fn status(&self) -> http::StatusCode {
            self.0.status()
        }
    }

    impl IntoResponse for VerifiedKeyRejection {
        fn into_response(self) -> Response {
            self.0.map(axum::body::Body::from)
        }
    }

    impl<S: Send + Sync> FromRequestParts<S> for VerifiedKey {
        type Rejection = VerifiedKeyRejection;

        async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, VerifiedKeyRejection> {
            if let Some(key) = parts.extensions.get::<VerifiedKey>() {
                return Ok(key.clone());
            }
            // A gate let it in without a key (optional mode): fail closed, in the layer's words.
            let missing =
                if parts.extensions.get::<Gated>().is_some() { Rejection::MissingKey } else { Rejection::NotGated };
            Err(VerifiedKeyRejection(refuse_after_gate(&parts.extensions, &missing)))
        }
    }

    impl<S: Send + Sync> OptionalFromRequestParts<S> for VerifiedKey {
        type Rejection = std::convert::Infallible;

        async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Option<Self>, Self::Rejection> {
            Ok(parts.extensions.get::<VerifiedKey>().cloned())
        }
    }
}

#[cfg(feature = "axum")]
pub use extractor::VerifiedKeyRejection;
