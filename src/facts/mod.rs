//! What a key is: its [`KeyStatus`] and its [`KeyFacts`] (id, scopes, expiry, metadata, its own
//! limits and allowance), as verifiers answer them, caches keep them and stores hold them.

mod metadata;

pub use metadata::Metadata;

use crate::limit::{RateLimit, Refill};
use crate::scope::Scope;
use serde::{Deserialize, Serialize};
use std::time::SystemTime;

#[doc = include_str!("../../docs/key_status.md")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[non_exhaustive]
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

#[doc = include_str!("../../docs/key_facts.md")]
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
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
    /// When `usage_limit` refills (counts from zero again), if it does.
    pub usage_refill: Option<Refill>,
    /// Limits and an allowance the key shares with every key of its identity (its customer, or
    /// the key alone if it has none). Boxed: most keys have none.
    pub identity_quota: Option<Box<IdentityQuota>>,
    /// Set when the presented key was rotated away: it keeps working until then (its grace
    /// window), and is refused as `EXPIRED` after. Stores set it on the record they find by an old
    /// key; it is never stored as a fact of the key itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grace_ends: Option<SystemTime>,
}

impl KeyFacts {
    /// Facts for key `id`, with no scopes, expiry, metadata or customer.
    pub fn new(id: impl Into<String>) -> Self {
        Self { id: id.into(), ..Self::default() }
    }

    /// These facts with `name`.
    #[must_use]
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// These facts with `scopes`.
    #[must_use]
    pub fn with_scopes(mut self, scopes: impl IntoIterator<Item = Scope>) -> Self {
        self.scopes = scopes.into_iter().collect();
        self
    }

    /// These facts with an expiry.
    #[must_use]
    pub fn with_expiry(mut self, at: SystemTime) -> Self {
        self.expires_at = Some(at);
        self
    }

    /// These facts with a metadata entry.
    #[must_use]
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// These facts with a customer.
    #[must_use]
    pub fn with_customer(mut self, customer_id: impl Into<String>) -> Self {
        self.customer_id = Some(customer_id.into());
        self
    }

    /// These facts with a rate limit of the key's own.
    #[must_use]
    pub fn with_rate_limit(mut self, limit: RateLimit) -> Self {
        self.rate_limit = Some(Box::new(limit));
        self
    }

    /// These facts with a usage allowance.
    #[must_use]
    pub fn with_usage_limit(mut self, limit: u64) -> Self {
        self.usage_limit = Some(limit);
        self
    }

    /// These facts with a usage allowance that refills on `refill`'s schedule.
    #[must_use]
    pub fn with_usage_refill(mut self, refill: Refill) -> Self {
        self.usage_refill = Some(refill);
        self
    }

    /// These facts with limits shared by every key of the key's identity.
    #[must_use]
    pub fn with_identity_quota(mut self, quota: IdentityQuota) -> Self {
        self.identity_quota = Some(Box::new(quota));
        self
    }

    /// The identity the key's shared counters belong to: its customer, or, without one, the key
    /// itself (kept apart from key ids, so it never meets another key's identity).
    #[must_use]
    pub fn identity(&self) -> &str {
        self.customer_id.as_deref().unwrap_or(&self.id)
    }

    /// When the presented key stops working, if ever: its expiry or the end of its grace
    /// window, whichever comes first.
    #[must_use]
    pub fn ends_at(&self) -> Option<SystemTime> {
        match (self.expires_at, self.grace_ends) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether the presented key is past its expiry, or its grace window, at `now`.
    #[must_use]
    pub fn is_expired_at(&self, now: SystemTime) -> bool {
        self.ends_at().is_some_and(|at| now >= at)
    }
}

#[doc = include_str!("../../docs/identity_quota.md")]
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct IdentityQuota {
    /// A rate limit on all of the identity's keys together.
    pub rate_limit: Option<RateLimit>,
    /// A usage allowance all of its keys spend from.
    pub usage_limit: Option<u64>,
    /// When that allowance refills, if it does.
    pub usage_refill: Option<Refill>,
}

impl IdentityQuota {
    /// No limit, no allowance.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// This quota with a rate limit on all of the identity's keys together.
    #[must_use]
    pub fn rate_limit(mut self, limit: RateLimit) -> Self {
        self.rate_limit = Some(limit);
        self
    }

    /// This quota with a usage allowance all of the identity's keys spend from.
    #[must_use]
    pub fn usage_limit(mut self, amount: u64) -> Self {
        self.usage_limit = Some(amount);
        self
    }

    /// This quota's allowance refilling on `refill`'s schedule.
    #[must_use]
    pub fn usage_refill(mut self, refill: Refill) -> Self {
        self.usage_refill = Some(refill);
        self
    }
}

#[doc = include_str!("../../docs/billing_meter.md")]
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
