//! The gate: one request's straight line, from key to verdict.
//!
//! `preflight? ─► route & scope ─► extract key ─► format check ─► verify (now, or later) ─► decide
//! ─► enforce (usage allowance, rate limits, charge)`

use crate::context::VerifiedKey;
use crate::extract::Extractor;
use crate::key::{ApiKey, KeyDigest, KeyFormat, PresentedKey, Redacted};
use crate::limit::{
    self, HeaderStyle, LimitRequest, LimitState, LimitVerdict, RateLimit, RateLimitHeaders, Refusal, UsageCharge,
};
use crate::outage::Outage;
use crate::reject::{Rejection, Responder};
use crate::scope::{Action, RequiredScope, Route, RouteEntry, ScopeMap, Unmapped};
use crate::usage::{allowance, Meter, UsageHandle, UsageOf};
use crate::verify::{
    Billing, BoxFuture, KeyStatus, RateLimitConfig, RateLimitState, Verification, Verifier, VerifyRequest,
};
use bytes::Bytes;
use http::{Method, Request, Response};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Everything the layer was configured with; shared by every clone of the layer and its services.
pub(crate) struct Gate {
    pub(crate) verifier: Arc<dyn Verifier>,
    pub(crate) extractor: Extractor,
    pub(crate) format: KeyFormat,
    pub(crate) routes: ScopeMap,
    pub(crate) hide_credentials: bool,
    pub(crate) optional: bool,
    pub(crate) allow_preflight: bool,
    pub(crate) responder: Arc<dyn Responder>,
    pub(crate) unavailable_retry_after: Duration,
    pub(crate) fail_open: bool,
    /// Requests let through unverified by `fail_open`.
    pub(crate) fail_open_count: AtomicU64,
    /// Limits on every gated request.
    pub(crate) limits: Vec<RateLimit>,
    /// A metadata field holding a key's own limit, such as `100/60s`.
    pub(crate) metadata_limit: Option<String>,
    pub(crate) header_style: HeaderStyle,
    pub(crate) meter: Arc<Meter>,
    /// `402` instead of `429` for spent usage allowances.
    pub(crate) usage_payment_required: bool,
    /// The verifier's and the limiter's failures, logged as state changes, not per request.
    pub(crate) verifier_outage: Outage,
    pub(crate) limiter_outage: Outage,
}

/// A request let through: its verified key (if any) and the rate-limit headers for its response.
pub(crate) type Passed = (Option<VerifiedKey>, Option<RateLimitHeaders>);

/// The gate's verdict on a request, as far as it can tell without waiting.
pub(crate) enum Admission {
    Pass(Passed),
    Reject(Rejection),
    /// The verifier or the limiter needs I/O: wait for this.
    Pending(BoxFuture<'static, Result<Passed, Rejection>>),
}

impl Gate {
    pub(crate) fn admit<B>(self: &Arc<Self>, req: &mut Request<B>) -> Admission {
        if self.allow_preflight && is_preflight(req) {
            return Admission::Pass((None, None));
        }
        let entry = match self.routes.resolve(matched_path(req), req.uri().path()) {
            Ok(entry) => entry,
            Err(rejection) => return self.refuse(rejection, None),
        };
        let scope = match self.required_scope(entry, req.method()) {
            Ok(Some(scope)) => scope,
            Ok(None) => return Admission::Pass((None, None)),
            Err(rejection) => return self.refuse(rejection, None),
        };
        let found = match self.extractor.extract(req) {
            Ok(Some(found)) => found,
            Ok(None) if self.optional => return Admission::Pass((None, None)),
            Ok(None) => return self.refuse(Rejection::MissingKey, None),
            Err(rejection) => return self.refuse(rejection, None),
        };
        if !self.format.accepts(&found.key) {
            return self.refuse(Rejection::InvalidKey(KeyStatus::Invalid), Some(&found.key));
        }
        let presented = PresentedKey::new(&found.key);
        let verification = self.verifier.verify_now(&presented);
        // The raw key outlives this borrow only where something needs it: the async verifier, or a
        // usage sink that reports by key. The SHA-256 is computed only on a miss.
        let raw = (verification.is_none() || self.meter.needs_key()).then(|| presented.to_owned_key());
        let miss = verification.is_none().then(|| *presented.digest());
        let source = found.source;
        if self.hide_credentials {
            self.extractor.hide(source, req);
        }
        let Some(verification) = verification else {
            let (key, digest) = (raw.expect("kept for the verifier"), miss.expect("hashed on a miss"));
            return Admission::Pending(self.verify_later(key, digest, scope, entry));
        };
        match self.decide(verification, scope.as_ref()) {
            Ok(key) => self.enforce(key, entry, raw, None),
            Err(rejection) => Admission::Reject(rejection),
        }
    }

    fn verify_later(
        self: &Arc<Self>,
        key: ApiKey,
        digest: KeyDigest,
        scope: Option<RequiredScope>,
        entry: &Arc<RouteEntry>,
    ) -> BoxFuture<'static, Result<Passed, Rejection>> {
        let mut request = VerifyRequest::hashed(digest, key.clone());
        request.scope = scope.clone();
        request.route = entry.template.clone();
        request.billing = entry
            .policy
            .usage
            .as_ref()
            .map(|u| Billing { usage: u.amount, usage_name: u.name.as_deref().map(str::to_owned) });
        request.rate_limit =
            entry.policy.limits.first().map(|l| RateLimitConfig { id: l.name().to_owned(), limit: l.limit() });
        let raw = self.meter.needs_key().then(|| key.clone());
        let verification = self.verifier.verify(request);
        let (gate, entry) = (Arc::clone(self), Arc::clone(entry));
        Box::pin(async move {
            let verification = match verification.await {
                Ok(verification) => {
                    // A stale answer means the verifier is still failing.
                    if !verification.stale {
                        gate.verifier_outage.recovered();
                    }
                    verification
                }
                Err(error) if gate.fail_open => {
                    gate.fail_open_count.fetch_add(1, Ordering::Relaxed);
                    gate.verifier_outage.failed(&error);
                    let mut key = VerifiedKey::fail_open();
                    key.set_responder(&gate.responder);
                    return Ok((Some(key), None));
                }
                Err(error) => {
                    gate.verifier_outage.failed(&error);
                    let retry_after = error.retry_after().unwrap_or(gate.unavailable_retry_after);
                    return Err(Rejection::Unavailable { retry_after });
                }
            };
            // Per-request Oneloop counted the route's usage and its first limit already.
            let counted = verification.counted.then_some(verification.rate_limit);
            let key = gate.decide(verification, scope.as_ref())?;
            match gate.enforce(key, &entry, raw, counted) {
                Admission::Pass(passed) => Ok(passed),
                Admission::Reject(rejection) => Err(rejection),
                Admission::Pending(limits) => limits.await,
            }
        })
    }

    /// What the route asks: `Ok(None)` for a public route, `Ok(Some(None))` for any valid key.
    fn required_scope(&self, entry: &RouteEntry, method: &Method) -> Result<Option<Option<RequiredScope>>, Rejection> {
        match &entry.route {
            Route::Public => Ok(None),
            Route::Resource(representation) => {
                let action = Action::from_method(method).ok_or(Rejection::UnmappedRoute)?;
                Ok(Some(Some(RequiredScope { representation: representation.clone(), action })))
            }
            Route::Unmapped => match self.routes.unmapped_policy() {
                Unmapped::AnyValidKey => Ok(Some(None)),
                Unmapped::Deny => Err(Rejection::UnmappedRoute),
            },
        }
    }

    /// The decision on a verifier's answer, made per request from the key's facts.
    fn decide(&self, verification: Verification, required: Option<&RequiredScope>) -> Result<VerifiedKey, Rejection> {
        let refused = match verification.status {
            KeyStatus::Valid => None,
            KeyStatus::InvalidScopes => {
                Some(required.cloned().map_or(Rejection::UnmappedRoute, Rejection::InsufficientScope))
            }
            KeyStatus::RateLimited => {
                Some(Rejection::RateLimited { retry_after: retry_after(&verification), limit: None })
            }
            KeyStatus::UsageLimited => Some(Rejection::UsageLimited { payment_required: self.usage_payment_required }),
            status => Some(Rejection::InvalidKey(status)),
        };
        let facts = match (refused, verification.facts) {
            (Some(rejection), facts) => return Err(self.log(rejection, facts.as_deref().map(|f| &*f.id))),
            // VALID without facts is a verifier bug: no safe answer.
            (None, None) => return Err(Rejection::Unavailable { retry_after: self.unavailable_retry_after }),
            (None, Some(facts)) => facts,
        };
        // Cached facts can outlive the key: expiry is checked on every request.
        if facts.expires_at.is_some() && facts.is_expired_at(SystemTime::now()) {
            return Err(self.log(Rejection::InvalidKey(KeyStatus::Expired), Some(&facts.id)));
        }
        if let Some(required) = required.filter(|r| !r.granted_by(&facts.scopes)) {
            return Err(self.log(Rejection::InsufficientScope(required.clone()), Some(&facts.id)));
        }
        Ok(VerifiedKey::new(facts, verification.stale))
    }

    /// Rate limits and usage allowance, decided together by the limiter (all or nothing), then the
    /// charge reported. A refused request is charged nothing.
    ///
    /// `counted` is `Some` when the verifier counted the route's usage and first rate limit itself
    /// (with that limit's state, if it reported one): each is then counted there only, never here.
    fn enforce(
        self: &Arc<Self>,
        mut key: VerifiedKey,
        entry: &RouteEntry,
        raw: Option<ApiKey>,
        counted: Option<Option<RateLimitState>>,
    ) -> Admission {
        let facts = key.facts().clone();
        let usage = entry.policy.usage.clone().filter(|_| counted.is_none());
        let upstream = counted.flatten().zip(entry.policy.limits.first()).map(|(state, limit)| LimitState {
            limit: limit.clone(),
            remaining: state.remaining,
            reset: state.reset_at.duration_since(SystemTime::now()).unwrap_or_default(),
        });
        let charge = usage.as_ref().filter(|u| u.amount > 0).and_then(|u| {
            let (allowed, reported) = allowance(&facts)?;
            Some(UsageCharge { allowed, reported, amount: u.amount })
        });
        key.set_usage(UsageHandle::new(self.meter.clone(), facts.clone(), raw));
        key.set_responder(&self.responder);
        let limits = self.limits_for(&facts, entry, counted.is_some());
        if limits.is_empty() && charge.is_none() {
            self.report(&key, usage.as_ref());
            let states: Vec<LimitState> = upstream.into_iter().collect();
            let headers = RateLimitHeaders::new(self.header_style, &states);
            if !states.is_empty() {
                key.set_rate_limits(states);
            }
            return Admission::Pass((Some(key), headers));
        }
        let finish = move |gate: &Gate, verdict: Result<LimitVerdict, limit::LimitError>| match verdict {
            Ok(Ok(mut states)) => {
                gate.limiter_outage.recovered();
                states.extend(upstream);
                gate.report(&key, usage.as_ref());
                let headers = RateLimitHeaders::new(gate.header_style, &states);
                key.set_rate_limits(states);
                Ok((Some(key), headers))
            }
            Ok(Err(Refusal::Rate(denied))) => {
                let rejection = Rejection::RateLimited { retry_after: denied.retry_after, limit: Some(denied.limit) };
                Err(gate.log(rejection, Some(&key.facts().id)))
            }
            Ok(Err(Refusal::Usage)) => {
                let rejection = Rejection::UsageLimited { payment_required: gate.usage_payment_required };
                Err(gate.log(rejection, Some(&key.facts().id)))
            }
            Err(error) => {
                gate.limiter_outage.failed(&error);
                Err(Rejection::Unavailable { retry_after: gate.unavailable_retry_after })
            }
        };
        let request = LimitRequest { limits: &limits, usage: charge };
        match self.meter.limiter.check_now(&facts.id, &request) {
            Some(verdict) => match finish(self, Ok(verdict)) {
                Ok(passed) => Admission::Pass(passed),
                Err(rejection) => Admission::Reject(rejection),
            },
            None => {
                let (gate, check) = (Arc::clone(self), self.meter.limiter.check(&facts.id, &request));
                Admission::Pending(Box::pin(async move { finish(&gate, check.await) }))
            }
        }
    }

    /// The layer's, the route's and the key's limits, each at the route's cost; without the route's
    /// first limit when the verifier counted it.
    fn limits_for(
        &self,
        facts: &crate::verify::KeyFacts,
        entry: &RouteEntry,
        verifier_counted: bool,
    ) -> Vec<(RateLimit, u64)> {
        let from_metadata = self.metadata_limit.as_deref().and_then(|field| {
            let text = facts.metadata.get(field)?;
            let parsed = parse_limit(text);
            if parsed.is_none() {
                tracing::debug!(key_id = %facts.id, field, "keygate: unreadable rate limit in key metadata; ignored");
            }
            parsed
        });
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
        limits
    }

    fn report(&self, key: &VerifiedKey, usage: Option<&crate::usage::RouteUsage>) {
        if let Some(u) = usage {
            let of = UsageOf { key_id: &key.facts().id, key: key.usage().key() };
            self.meter.charge(of, u.name.as_deref(), u.amount);
        }
    }

    fn refuse(&self, rejection: Rejection, key: Option<&str>) -> Admission {
        if let Some(key) = key {
            tracing::debug!(%rejection, key = %Redacted::of(key), "keygate: refused");
        } else {
            tracing::debug!(%rejection, "keygate: refused");
        }
        Admission::Reject(rejection)
    }

    fn log(&self, rejection: Rejection, key_id: Option<&str>) -> Rejection {
        tracing::debug!(%rejection, key_id, "keygate: refused");
        rejection
    }

    /// Puts what the gate learnt into the request for the inner service: the verified key, or a
    /// mark that a gate let it through without one.
    pub(crate) fn hand_over<B>(&self, req: &mut Request<B>, key: Option<VerifiedKey>) {
        let extensions = req.extensions_mut();
        match key {
            Some(key) => drop(extensions.insert(key)),
            None => drop(extensions.insert(crate::context::Gated(Arc::clone(&self.responder)))),
        }
    }

    /// The responder's response, with the rate-limit headers of a `429`.
    pub(crate) fn respond(&self, rejection: &Rejection) -> Response<Bytes> {
        let mut response = self.responder.respond(rejection);
        if let Rejection::RateLimited { retry_after, limit: Some(limit) } = rejection {
            let state = LimitState { limit: limit.clone(), remaining: 0, reset: *retry_after };
            if let Some(headers) = RateLimitHeaders::new(self.header_style, &[state]) {
                headers.insert_into(response.headers_mut());
            }
        }
        response
    }
}

/// A limit written as `100/60s`, `100/s`, `100/min` or `100/h`.
fn parse_limit(text: &str) -> Option<RateLimit> {
    let (n, per) = text.trim().split_once('/')?;
    let window = match per.trim() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        // A window past RateLimit::MAX_WINDOW is refused by RateLimit::new below.
        secs => Duration::from_secs(secs.strip_suffix('s')?.parse().ok()?),
    };
    RateLimit::new("key", n.trim().parse().ok()?, window).ok()
}

/// Until the verifier's reported reset, or a second when it reported none.
fn retry_after(verification: &Verification) -> Duration {
    let reset = verification.rate_limit.map(|r| r.reset_at.duration_since(SystemTime::now()).unwrap_or_default());
    reset.unwrap_or(Duration::from_secs(1))
}

/// A CORS preflight: `OPTIONS` with `Origin` and `Access-Control-Request-Method` (browsers send
/// both; without an `Origin` it is a plain `OPTIONS` that needs a key).
fn is_preflight<B>(req: &Request<B>) -> bool {
    let headers = req.headers();
    req.method() == Method::OPTIONS
        && headers.contains_key(http::header::ORIGIN)
        && headers.contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD)
}

#[cfg(feature = "axum")]
fn matched_path<B>(req: &Request<B>) -> Option<&str> {
    req.extensions().get::<axum::extract::MatchedPath>().map(|m| m.as_str())
}

#[cfg(not(feature = "axum"))]
fn matched_path<B>(_: &Request<B>) -> Option<&str> {
    None
}

#[cfg(test)]
mod tests {
    #[test]
    fn metadata_limits() {
        let l = super::parse_limit("100/60s").unwrap();
        assert_eq!((l.limit(), l.window().as_secs()), (100, 60));
        assert_eq!(super::parse_limit(" 5 / min ").unwrap().window().as_secs(), 60);
        for bad in ["", "100", "0/s", "x/s", "100/fortnight", "-1/s"] {
            assert!(super::parse_limit(bad).is_none(), "{bad}");
        }
    }
}
