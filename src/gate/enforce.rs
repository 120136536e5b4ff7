//! Enforcement: a verified key's rate limits and usage allowance, decided together by the limiter
//! (all or nothing), then its usage recorded. A refused request is charged nothing.

use super::decide::logged;
use super::{Admission, Refusals};
use crate::context::VerifiedKey;
use crate::facts::KeyFacts;
use crate::key::ApiKey;
use crate::limit::{
    self, HeaderStyle, IdentityLimits, LimitRequest, LimitState, LimitVerdict, RateLimit, RateLimitHeaders, Refusal,
};
use crate::outage::Outage;
use crate::reject::Rejection;
use crate::route::RouteEntry;
use crate::usage::{allowance, identity_allowance, Metering, RouteUsage, UsageHandle, UsageOf};
use crate::verify::ReportedLimit;
use std::borrow::Cow;
use std::sync::Arc;
use std::time::SystemTime;

/// The limits every request is held to, and where usage is counted and recorded.
pub(crate) struct Enforce {
    /// Limits on every gated request.
    pub(crate) limits: Vec<RateLimit>,
    /// A metadata field holding a key's own limit, such as `100/60s`.
    pub(crate) metadata_limit: Option<String>,
    pub(crate) metering: Arc<Metering>,
    pub(crate) header_style: HeaderStyle,
    pub(crate) refusals: Refusals,
    /// The limiter's failures, logged as state changes, not per request.
    pub(crate) outage: Outage,
}

/// What the verifier counted itself (Oneloop's per-request mode): the route's usage and its first
/// rate limit, with that limit's state if it reported one. Each is then counted there only.
pub(crate) type CountedUpstream = Option<Option<ReportedLimit>>;

impl Enforce {
    /// Holds `key` to its limits and allowance on `entry`; `raw` is kept for usage sinks that
    /// report by key.
    pub(crate) fn enforce(
        self: &Arc<Self>,
        mut key: VerifiedKey,
        entry: &RouteEntry,
        raw: Option<ApiKey>,
        counted: CountedUpstream,
    ) -> Admission {
        let facts = key.facts().clone();
        // Nothing to count or charge (the common case without limits): no limiter, no headers. The
        // entry's limits already hold the layer's and the route's.
        let key_limited = self.metadata_limit.is_some() || facts.rate_limit.is_some();
        let identity = self.metering.identity_of(&facts);
        let nothing = entry.limits.is_empty() && !key_limited && identity.is_none();
        if nothing && entry.policy.usage.is_none() && counted.is_none() {
            key.set_usage(UsageHandle::new(self.metering.clone(), facts, raw));
            return Admission::Pass((Some(key), None));
        }
        let usage = entry.policy.usage.clone().filter(|_| counted.is_none());
        let upstream = counted.flatten().zip(entry.policy.limits.first()).map(|(state, limit)| LimitState {
            limit: limit.clone(),
            remaining: state.remaining,
            reset: state.reset_at.duration_since(SystemTime::now()).unwrap_or_default(),
        });
        let amount = usage.as_ref().map_or(0, |u| u.amount);
        let charge = (amount > 0).then(|| allowance(&facts, amount)).flatten();
        let shared_limits = identity.map(|_| self.identity_limits_for(&facts, entry)).unwrap_or_default();
        let identity = identity.map(|id| IdentityLimits {
            id,
            limits: &shared_limits,
            usage: (amount > 0).then(|| identity_allowance(&facts, amount)).flatten(),
        });
        key.set_usage(UsageHandle::new(self.metering.clone(), facts.clone(), raw));
        let limits = self.limits_for(&facts, entry, counted.is_some());
        let request = LimitRequest { limits: &limits, usage: charge, identity };
        if request.is_empty() {
            self.record(&key, usage.as_ref());
            let states: Vec<LimitState> = upstream.into_iter().collect();
            let headers = RateLimitHeaders::new(self.header_style, &states);
            if !states.is_empty() {
                key.set_rate_limits(states);
            }
            return Admission::Pass((Some(key), headers));
        }
        let finish = move |this: &Self, verdict: Result<LimitVerdict, limit::LimitError>| match verdict {
            Ok(Ok(mut states)) => {
                this.outage.recovered();
                states.extend(upstream);
                this.record(&key, usage.as_ref());
                let headers = RateLimitHeaders::new(this.header_style, &states);
                key.set_rate_limits(states);
                Ok((Some(key), headers))
            }
            Ok(Err(Refusal::Rate(denied))) => {
                let rejection = Rejection::RateLimited { retry_after: denied.retry_after, limit: Some(denied.limit) };
                Err(logged(rejection, Some(&key.facts().id)))
            }
            Ok(Err(Refusal::Usage)) => Err(logged(this.refusals.usage_limited(), Some(&key.facts().id))),
            Err(error) => {
                this.outage.failed(&error);
                Err(this.refusals.unavailable())
            }
        };
        match self.metering.limiter.check_now(&facts.id, &request) {
            Some(verdict) => match finish(self, Ok(verdict)) {
                Ok(passed) => Admission::Pass(passed),
                Err(rejection) => Admission::Reject(rejection),
            },
            None => {
                let (this, check) = (Arc::clone(self), self.metering.limiter.check(&facts.id, &request));
                Admission::Pending(Box::pin(async move { finish(&this, check.await) }))
            }
        }
    }

    /// The layer's, the route's and the key's limits, each at the route's cost; without the route's
    /// first limit when the verifier counted it. Borrowed from the route entry, where the layer's and
    /// the route's were combined at build time, unless the key adds one or the verifier counted.
    fn limits_for<'e>(
        &self,
        facts: &KeyFacts,
        entry: &'e RouteEntry,
        verifier_counted: bool,
    ) -> Cow<'e, [(RateLimit, u64)]> {
        let from_metadata = self.metadata_limit.as_deref().and_then(|field| {
            let text = facts.metadata.get(field)?;
            let parsed = RateLimit::parse("key", text);
            if parsed.is_err() {
                tracing::debug!(key_id = %facts.id, field, "keygate: unreadable rate limit in key metadata; ignored");
            }
            parsed.ok()
        });
        if !verifier_counted && facts.rate_limit.is_none() && from_metadata.is_none() {
            return Cow::Borrowed(&entry.limits);
        }
        let cost = entry.policy.cost;
        let mut limits: Vec<(RateLimit, u64)> = Vec::new();
        let route = entry.policy.limits.iter().skip(usize::from(verifier_counted));
        let all = self.limits.iter().chain(route).chain(facts.rate_limit.as_deref());
        // The same limit from two places (layer and route, key and metadata) is one limit.
        for limit in all.chain(from_metadata.as_ref()) {
            if !limits.iter().any(|(l, _)| l == limit) {
                limits.push((limit.clone(), cost));
            }
        }
        Cow::Owned(limits)
    }

    /// The identity's limits (the layer's, then the key's own), each at the route's cost.
    fn identity_limits_for(&self, facts: &KeyFacts, entry: &RouteEntry) -> Vec<(RateLimit, u64)> {
        let cost = entry.policy.cost;
        let own = facts.identity_quota.as_deref().and_then(|q| q.rate_limit.as_ref());
        self.metering.identity_limits.iter().chain(own).map(|l| (l.clone(), cost)).collect()
    }

    fn record(&self, key: &VerifiedKey, usage: Option<&RouteUsage>) {
        if let Some(u) = usage {
            let of = UsageOf { key_id: &key.facts().id, key: key.usage().key() };
            self.metering.record(of, u.name.as_deref(), u.amount);
        }
    }
}

/// The rate-limit headers of a `429` a limit refused with (the limit, none left, its reset).
pub(crate) fn refused_headers(style: HeaderStyle, rejection: &Rejection) -> Option<RateLimitHeaders> {
    let Rejection::RateLimited { retry_after, limit: Some(limit) } = rejection else { return None };
    let state = LimitState { limit: limit.clone(), remaining: 0, reset: *retry_after };
    RateLimitHeaders::new(style, &[state])
}
