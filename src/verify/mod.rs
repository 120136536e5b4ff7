//! The pluggable part: a [`Verifier`] says what a key is.
//!
//! The trait is object-safe, so the layer's type does not change with the verifier and verifiers
//! compose (a cache wraps any verifier). It has two halves:
//! - [`Verifier::verify_now`] answers synchronously when no I/O is needed (a cache hit, an in-memory
//!   store). This is the hot path: no allocation, no await.
//! - [`Verifier::verify`] answers the rest asynchronously; it is called with an owned request and
//!   returns a boxed future, one allocation on a path that is about to do I/O anyway.

pub mod local;
mod metadata;
#[cfg(feature = "oneloop")]
pub mod oneloop;

pub use local::LocalVerifier;
pub use metadata::Metadata;

use crate::key::{ApiKey, KeyDigest, PresentedKey};
use crate::limit::RateLimit;
use crate::scope::{RequiredScope, Scope};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// A boxed, `Send` future, as returned by the asynchronous halves of the traits.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Oneloop's verification statuses.
///
/// The local verifier decides them in this order, first match wins: `INVALID` (unknown key or bad
/// format), `DELETED`, `DISABLED`, `EXPIRED`, then per request `INVALID_SCOPES`, `USAGE_LIMITED`,
/// `RATE_LIMITED`, and `VALID` when nothing refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum KeyStatus {
    /// The key may be used.
    Valid,
    /// Past its `expires_at`.
    Expired,
    /// Switched off; may be switched on again.
    Disabled,
    /// Deleted for good.
    Deleted,
    /// Over a rate limit.
    RateLimited,
    /// Over its usage limit.
    UsageLimited,
    /// Lacks the requested scope.
    InvalidScopes,
    /// Unknown.
    Invalid,
}

/// What a key is: the facts that are cached per key digest. Never the key itself.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub struct KeyFacts {
    /// The key's id (Oneloop's `apiKeyId`).
    pub id: String,
    /// A human name, if any.
    pub name: Option<String>,
    /// The scopes the key holds.
    pub scopes: Vec<Scope>,
    /// When the key stops working, if ever.
    pub expires_at: Option<SystemTime>,
    /// Free-form metadata.
    pub metadata: Metadata,
    /// The customer the key belongs to.
    pub customer_id: Option<String>,
    /// The customer's billing meter (Oneloop), if any. Boxed: most keys have none.
    pub billing: Option<Box<BillingMeter>>,
    /// Oneloop's `externalMeterId`.
    pub external_meter_id: Option<String>,
    /// The key's own rate limit (local verifier), enforced with the layer's and the route's. Boxed:
    /// most keys have none.
    pub rate_limit: Option<Box<RateLimit>>,
    /// The key's usage allowance in total (local verifier); Oneloop keys use `billing` instead.
    pub usage_limit: Option<u64>,
}

/// A customer's credit meter, as Oneloop reports it. Amounts are whole credits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BillingMeter {
    /// The meter's id.
    pub id: String,
    /// Credits granted in total.
    pub total_credits: u128,
    /// Credits used so far.
    pub used_credits: u128,
    /// Whether usage may go past `total_credits`.
    pub allow_overages: bool,
    /// The most that may be used with overages, if capped.
    pub spend_cap: Option<u128>,
}

impl BillingMeter {
    /// A meter with these amounts, no overages and no cap.
    pub fn new(id: impl Into<String>, total_credits: u128, used_credits: u128) -> Self {
        Self { id: id.into(), total_credits, used_credits, allow_overages: false, spend_cap: None }
    }
}

/// A rate limit's state as a verifier reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitState {
    /// Requests left in the window.
    pub remaining: u64,
    /// When the window resets.
    pub reset_at: SystemTime,
}

impl KeyFacts {
    /// Facts for key `id`, with no scopes, expiry, metadata or customer.
    pub fn new(id: impl Into<String>) -> Self {
        Self { id: id.into(), ..Self::default() }
    }

    /// These facts with `name`.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// These facts with `scopes`.
    pub fn with_scopes(mut self, scopes: impl IntoIterator<Item = Scope>) -> Self {
        self.scopes = scopes.into_iter().collect();
        self
    }

    /// These facts with an expiry.
    pub fn with_expiry(mut self, at: SystemTime) -> Self {
        self.expires_at = Some(at);
        self
    }

    /// These facts with a metadata entry.
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// These facts with a customer.
    pub fn with_customer(mut self, customer_id: impl Into<String>) -> Self {
        self.customer_id = Some(customer_id.into());
        self
    }

    /// These facts with a rate limit of the key's own.
    pub fn with_rate_limit(mut self, limit: RateLimit) -> Self {
        self.rate_limit = Some(Box::new(limit));
        self
    }

    /// These facts with a usage allowance.
    pub fn with_usage_limit(mut self, limit: u64) -> Self {
        self.usage_limit = Some(limit);
        self
    }

    /// Whether the key is past its expiry at `now`.
    pub fn is_expired_at(&self, now: SystemTime) -> bool {
        self.expires_at.is_some_and(|at| now >= at)
    }
}

/// A verifier's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Verification {
    /// The status.
    pub status: KeyStatus,
    /// What the key is; `None` when the key is unknown.
    pub facts: Option<Arc<KeyFacts>>,
    /// The verifier's own rate-limit state, when it reported one (Oneloop's `rateLimit`).
    pub rate_limit: Option<RateLimitState>,
    /// Served from a cache past its freshness because the verifier failed (stale-if-error).
    pub stale: bool,
    /// The verifier itself counted this request's [`billing`](VerifyRequest::billing) usage and
    /// [`rate_limit`](VerifyRequest::rate_limit) (Oneloop's per-request mode), so the layer counts
    /// neither again: it records no usage for the route and enforces that limit from
    /// [`rate_limit`](Self::rate_limit) alone.
    pub counted: bool,
}

impl Verification {
    /// An unknown key.
    pub fn invalid() -> Self {
        Self { status: KeyStatus::Invalid, facts: None, rate_limit: None, stale: false, counted: false }
    }

    /// A key with `status` and `facts`.
    pub fn new(status: KeyStatus, facts: Arc<KeyFacts>) -> Self {
        Self { status, facts: Some(facts), rate_limit: None, stale: false, counted: false }
    }
}

/// What the asynchronous half of a verifier is asked.
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
    /// Usage this request is billed (Oneloop's `billing`), for verifiers that meter per request.
    pub billing: Option<Billing>,
    /// A named rate limit to apply (Oneloop's `rateLimitConfig`), for verifiers that limit per
    /// request.
    pub rate_limit: Option<RateLimitConfig>,
}

/// Usage a request is billed: an amount and an optional usage name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Billing {
    /// The amount.
    pub usage: u64,
    /// What is counted, such as `tokens`.
    pub usage_name: Option<String>,
}

/// A named rate limit: at most `limit` requests per window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// The limit's name.
    pub id: String,
    /// Requests per window; at least 1.
    pub limit: u64,
}

impl VerifyRequest {
    /// A request for `key` with no scope or route.
    pub fn new(key: ApiKey) -> Self {
        Self::hashed(key.digest(), key)
    }

    /// A request for a key whose digest the gate already computed.
    pub(crate) fn hashed(digest: KeyDigest, key: ApiKey) -> Self {
        Self { digest, key, scope: None, route: None, billing: None, rate_limit: None }
    }
}

/// A verifier could not answer. The gate fails closed on it: `503` with `Retry-After`.
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
    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// When to try again, if the verifier knows.
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

/// Says what a key is.
///
/// ```
/// use keygate::verify::{BoxFuture, KeyFacts, KeyStatus, Verification, Verifier, VerifyError, VerifyRequest};
/// use keygate::{KeyDigest, PresentedKey};
/// use std::sync::Arc;
///
/// /// Accepts one hard-wired digest (a test double, say).
/// struct OneKey(KeyDigest, Arc<KeyFacts>);
///
/// impl Verifier for OneKey {
///     fn verify_now(&self, key: &PresentedKey<'_>) -> Option<Verification> {
///         Some(if *key.digest() == self.0 {
///             Verification::new(KeyStatus::Valid, self.1.clone())
///         } else {
///             Verification::invalid()
///         })
///     }
///     fn verify(&self, req: VerifyRequest) -> BoxFuture<'static, Result<Verification, VerifyError>> {
///         let answer = self.verify_now(&PresentedKey::new(req.key.expose_secret()));
///         Box::pin(async move { answer.ok_or_else(|| VerifyError::new("unreachable")) })
///     }
/// }
/// let layer = keygate::ApiKeyLayer::new(OneKey(KeyDigest::of("k"), Arc::new(KeyFacts::new("key_1"))));
/// # let _ = layer;
/// ```
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
