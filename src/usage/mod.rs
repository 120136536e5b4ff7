#![doc = include_str!("../../docs/usage.md")]

use crate::facts::KeyFacts;
use crate::key::ApiKey;
use crate::limit::{IdentityLimits, LimitRequest, Limiter, RateLimit, UsageCharge};
use std::fmt;
use std::sync::Arc;

#[doc = include_str!("../../docs/route_usage.md")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteUsage {
    /// The amount.
    pub amount: u64,
    /// What is counted (Oneloop's `usageName`); `None` for the default usage.
    pub name: Option<Arc<str>>,
}

#[doc = include_str!("../../docs/usage_of.md")]
#[derive(Debug, Clone, Copy)]
pub struct UsageOf<'a> {
    /// The key's id.
    pub key_id: &'a str,
    /// The raw key, only for sinks that ask for it ([`UsageSink::needs_key`]): Oneloop's
    /// `record-usage` identifies keys by their value. Redacted in `Debug`.
    pub key: Option<&'a ApiKey>,
}

#[doc = include_str!("../../docs/usage_sink.md")]
pub trait UsageSink: Send + Sync + 'static {
    /// Reports `amount` of `name` used by a key.
    fn record(&self, of: UsageOf<'_>, name: Option<&str>, amount: u64);

    /// Whether [`record`](Self::record) needs the raw key (default `false`). When `true`, the raw
    /// key is kept with the request's [`UsageHandle`] until the request ends.
    fn needs_key(&self) -> bool {
        false
    }
}

impl<S: UsageSink + ?Sized> UsageSink for Arc<S> {
    fn record(&self, of: UsageOf<'_>, name: Option<&str>, amount: u64) {
        (**self).record(of, name, amount)
    }

    fn needs_key(&self) -> bool {
        (**self).needs_key()
    }
}

/// What `amount` takes from a key's allowance (what it may use, what its verifier last reported
/// as used, when it refills); `None` when it is unlimited.
pub(crate) fn allowance(facts: &KeyFacts, amount: u64) -> Option<UsageCharge> {
    let (allowed, reported, refill) = match &facts.billing {
        Some(m) if m.allow_overages => (m.spend_cap?, m.used_credits, None),
        Some(m) => (m.total_credits, m.used_credits, None),
        None => (u128::from(facts.usage_limit?), 0, facts.usage_refill),
    };
    Some(UsageCharge { allowed, reported, amount, refill })
}

/// What `amount` takes from the allowance the key's identity shares; `None` when it has none.
pub(crate) fn identity_allowance(facts: &KeyFacts, amount: u64) -> Option<UsageCharge> {
    let quota = facts.identity_quota.as_deref()?;
    Some(UsageCharge { allowed: u128::from(quota.usage_limit?), reported: 0, amount, refill: quota.usage_refill })
}

/// The layer's counters and where usage is reported: the limiter keeps rate limits and usage
/// against allowances, the sink reports usage.
pub(crate) struct Metering {
    pub(crate) limiter: Arc<dyn Limiter>,
    pub(crate) sink: Option<Arc<dyn UsageSink>>,
    /// Limits on every identity.
    pub(crate) identity_limits: Vec<RateLimit>,
}

impl Metering {
    /// The identity whose counters a key shares, if the layer or the key gives it limits: every
    /// request of such a key names it, so the key's counters stay in one place.
    pub(crate) fn identity_of<'f>(&self, facts: &'f KeyFacts) -> Option<&'f str> {
        (!self.identity_limits.is_empty() || facts.identity_quota.is_some()).then(|| facts.identity())
    }

    /// Records usage with the sink (never refused: the allowance was checked by the limiter).
    pub(crate) fn record(&self, of: UsageOf<'_>, name: Option<&str>, amount: u64) {
        if amount == 0 {
            return;
        }
        if let Some(sink) = &self.sink {
            sink.record(of, name, amount);
        }
    }

    pub(crate) fn needs_key(&self) -> bool {
        self.sink.as_ref().is_some_and(|s| s.needs_key())
    }
}

#[doc = include_str!("../../docs/usage_handle.md")]
#[derive(Clone)]
pub struct UsageHandle {
    inner: Option<HandleInner>,
}

#[derive(Clone)]
struct HandleInner {
    metering: Arc<Metering>,
    facts: Arc<KeyFacts>,
    key: Option<ApiKey>,
}

impl UsageHandle {
    pub(crate) fn none() -> Self {
        Self { inner: None }
    }

    pub(crate) fn new(metering: Arc<Metering>, facts: Arc<KeyFacts>, key: Option<ApiKey>) -> Self {
        Self { inner: Some(HandleInner { metering, facts, key }) }
    }

    /// The raw key, kept only for sinks that need it.
    pub(crate) fn key(&self) -> Option<&ApiKey> {
        self.inner.as_ref()?.key.as_ref()
    }

    /// Adds `amount` of `name` (use `""` for the default usage). Counted against the key's
    /// allowance for later requests (it is never refused: the work is done) and reported.
    pub fn add(&self, name: &str, amount: u64) {
        let Some(h) = &self.inner else { return };
        let identity = h.metering.identity_of(&h.facts).map(|id| IdentityLimits {
            id,
            limits: &[],
            usage: identity_allowance(&h.facts, amount),
        });
        let charged = LimitRequest { limits: &[], usage: allowance(&h.facts, amount), identity };
        if amount > 0 && !charged.is_empty() {
            h.metering.limiter.charge(&h.facts.id, &charged);
        }
        let of = UsageOf { key_id: &h.facts.id, key: h.key.as_ref() };
        h.metering.record(of, Some(name).filter(|n| !n.is_empty()), amount);
    }
}

impl fmt::Debug for UsageHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UsageHandle").field("key_id", &self.inner.as_ref().map(|h| &h.facts.id)).finish()
    }
}
