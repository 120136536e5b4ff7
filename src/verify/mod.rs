//! The pluggable part: a [`Verifier`] says what a key is.
//!
//! The trait is object-safe, so the layer's type does not change with the verifier and verifiers
//! compose (a cache wraps any verifier). It has two halves:
//! - [`Verifier::verify_now`] answers synchronously when no I/O is needed (a cache hit, an in-memory
//!   store). This is the hot path: no allocation, no await.
//! - [`Verifier::verify`] answers the rest asynchronously; it is called with an owned request and
//!   returns a boxed future, one allocation on a path that is about to do I/O anyway.

pub mod local;

pub use crate::facts::{BillingMeter, IdentityQuota, KeyFacts, KeyStatus, Metadata};
pub use local::LocalVerifier;

use crate::key::{ApiKey, KeyDigest, PresentedKey};
use crate::limit::RateLimit;
use crate::scope::RequiredScope;
use crate::usage::RouteUsage;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub use crate::boxed::BoxFuture;

#[doc = include_str!("../../docs/reported_limit.md")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportedLimit {
    /// Requests left in the window.
    pub remaining: u64,
    /// When the window resets.
    pub reset_at: SystemTime,
}

#[doc = include_str!("../../docs/verification.md")]
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Verification {
    /// The status.
    pub status: KeyStatus,
    /// What the key is; `None` when the key is unknown.
    pub facts: Option<Arc<KeyFacts>>,
    /// The verifier's own rate-limit state, when it reported one (Oneloop's `rateLimit`).
    pub rate_limit: Option<ReportedLimit>,
    /// Served from a cache past its freshness because the verifier failed (stale-if-error).
    pub stale: bool,
    /// The verifier itself counted this request's [`usage`](VerifyRequest::usage) usage and
    /// [`rate_limit`](VerifyRequest::rate_limit) (Oneloop's per-request mode), so the layer counts
    /// neither again: it records no usage for the route and enforces that limit from
    /// [`rate_limit`](Self::rate_limit) alone.
    pub counted: bool,
}

impl Verification {
    /// An unknown key.
    #[must_use]
    pub fn invalid() -> Self {
        Self { status: KeyStatus::Invalid, facts: None, rate_limit: None, stale: false, counted: false }
    }

    /// A key with `status` and `facts`.
    #[must_use]
    pub fn new(status: KeyStatus, facts: Arc<KeyFacts>) -> Self {
        Self { status, facts: Some(facts), rate_limit: None, stale: false, counted: false }
    }
}

#[doc = include_str!("../../docs/verify_request.md")]
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct VerifyRequest {
    /// The presented key; redacted in `Debug`.
    pub key: ApiKey,
    /// Its digest.
    pub digest: KeyDigest,
    /// The scope the request needs, if the route has one.
    pub scope: Option<RequiredScope>,
    /// The route template the request matched, if known.
    pub route: Option<Arc<str>>,
    /// The route's usage (Oneloop's `billing`), for verifiers that meter per request.
    pub usage: Option<RouteUsage>,
    /// The route's first rate limit (Oneloop's `rateLimitConfig`), for verifiers that limit per
    /// request.
    pub rate_limit: Option<RateLimit>,
}

impl VerifyRequest {
    /// A request for `key` with no scope or route.
    #[must_use]
    pub fn new(key: ApiKey) -> Self {
        Self::hashed(key.digest(), key)
    }

    /// A request for a key whose digest the gate already computed.
    pub(crate) fn hashed(digest: KeyDigest, key: ApiKey) -> Self {
        Self { digest, key, scope: None, route: None, usage: None, rate_limit: None }
    }
}

#[doc = include_str!("../../docs/verify_error.md")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyError {
    message: String,
    retry_after: Option<Duration>,
}

impl VerifyError {
    /// An error with a message. Never put a key in it.
    pub fn new(message: impl Into<String>) -> Self {
        Self { message: message.into(), retry_after: None }
    }

    /// This error with a hint of when an answer may be possible again (a circuit breaker's
    /// cool-down, say): it becomes the `503`'s `Retry-After`.
    #[must_use]
    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// When to try again, if the verifier knows.
    #[must_use]
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for VerifyError {}

#[doc = include_str!("../../docs/verifier.md")]
pub trait Verifier: Send + Sync + 'static {
    /// The answer, if it can be given without I/O. `None` sends the request to [`Verifier::verify`].
    /// Look the key up by its [`fingerprint`](PresentedKey::fingerprint) where you can: its
    /// [`digest`](PresentedKey::digest) costs a SHA-256.
    fn verify_now(&self, key: &PresentedKey<'_>) -> Option<Verification> {
        let _ = key;
        None
    }

    /// The answer, with whatever I/O it takes. Implementations clone what the future needs (they
    /// are usually a handle around an `Arc`).
    fn verify(&self, request: VerifyRequest) -> BoxFuture<'static, Result<Verification, VerifyError>>;
}

impl<V: Verifier + ?Sized> Verifier for Arc<V> {
    fn verify_now(&self, key: &PresentedKey<'_>) -> Option<Verification> {
        (**self).verify_now(key)
    }

    fn verify(&self, request: VerifyRequest) -> BoxFuture<'static, Result<Verification, VerifyError>> {
        (**self).verify(request)
    }
}
