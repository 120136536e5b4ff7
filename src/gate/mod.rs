//! The gate: one request's straight line, from key to verdict, each step a small policy of its own.
//!
//! `intake (preflight? key, format) ─► route (what it requires) ─► verify (now, or later) ─► decide
//! (status, expiry, scope) ─► enforce (rate limits and usage allowance, then usage recorded) ─► hand over`

mod decide;
mod enforce;
mod intake;

pub(crate) use decide::Decide;
pub(crate) use enforce::Enforce;
pub(crate) use intake::Intake;

use crate::boxed::BoxFuture;
use crate::context::{Gated, VerifiedKey};
use crate::key::{ApiKey, KeyDigest, PresentedKey};
use crate::limit::RateLimitHeaders;
use crate::observe;
use crate::outage::Outage;
use crate::reject::{Rejection, Responder};
use crate::route::{Requirement, RouteEntry, RouteTable};
use crate::scope::RequiredScope;
use crate::verify::{Verification, Verifier, VerifyError, VerifyRequest};
use bytes::Bytes;
use http::{Request, Response};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tracing::field::Empty;
use tracing::Span;

/// Everything the layer was configured with, one field per step; shared by every clone of the
/// layer and its services.
pub(crate) struct Gate {
    pub(crate) intake: Intake,
    pub(crate) routes: RouteTable,
    pub(crate) verifier: Arc<dyn Verifier>,
    pub(crate) unverifiable: Unverifiable,
    pub(crate) decide: Decide,
    pub(crate) enforce: Arc<Enforce>,
    pub(crate) responder: Arc<dyn Responder>,
    /// Where decisions on requests that reached no route entry (preflight, a bad path) are counted.
    pub(crate) unrouted: RouteEntry,
}

/// What happens when the verifier cannot answer.
pub(crate) struct Unverifiable {
    /// Let the request through without a key's facts, instead of a `503`.
    pub(crate) fail_open: bool,
    /// Requests let through unverified by `fail_open`.
    pub(crate) fail_open_count: AtomicU64,
    /// The verifier's failures, logged as state changes, not per request.
    pub(crate) outage: Outage,
}

/// The refusals whose wording the layer configures, made the same way by every step.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Refusals {
    /// `402` instead of `429` for spent usage allowances.
    pub(crate) usage_payment_required: bool,
    /// `Retry-After` of a `503`, unless the failing dependency says when.
    pub(crate) unavailable_retry_after: Duration,
}

impl Refusals {
    pub(crate) fn usage_limited(self) -> Rejection {
        Rejection::UsageLimited { payment_required: self.usage_payment_required }
    }

    pub(crate) fn unavailable(self) -> Rejection {
        Rejection::Unavailable { retry_after: self.unavailable_retry_after }
    }
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
    /// The gate's verdict on a request, counted (feature `metrics`) by outcome, cause and route; a
    /// pending verdict is counted when it settles.
    pub(crate) fn admit<B>(self: &Arc<Self>, req: &mut Request<B>, span: &Span) -> Admission {
        let mut entry = &self.unrouted;
        let admission = self.admit_uncounted(req, &mut entry, span);
        match &admission {
            Admission::Pass((key, _)) => count(&Ok(key.as_ref()), entry, span),
            Admission::Reject(rejection) => count(&Err(rejection), entry, span),
            Admission::Pending(_) => {}
        }
        admission
    }

    /// The span of one gated request (DEBUG, named `keygate`); its fields are filled in as the gate
    /// learns them. Never a key: the key's id at most.
    pub(crate) fn span() -> Span {
        // With `tracing`'s `log` feature (axum's default turns it on) even a disabled span formats
        // its fields for `log` when made, entered or recorded: where no subscriber wants DEBUG, make
        // none at all.
        if !tracing::level_enabled!(tracing::Level::DEBUG) {
            return Span::none();
        }
        tracing::debug_span!(
            "keygate",
            outcome = Empty,
            cause = Empty,
            route = Empty,
            key_id = Empty,
            scope = Empty,
            cache = Empty
        )
    }

    /// The verdict; `reached` is set to the route entry it was reached under, if the path resolved.
    fn admit_uncounted<'g, B>(
        self: &'g Arc<Self>,
        req: &mut Request<B>,
        reached: &mut &'g RouteEntry,
        span: &Span,
    ) -> Admission {
        if self.intake.lets_through(req) {
            return Admission::Pass((None, None));
        }
        let entry = match self.routes.resolve(matched_path(req), req.uri().path()) {
            Ok(entry) => entry,
            Err(rejection) => return refused(rejection),
        };
        *reached = entry;
        let scope = match self.routes.requirement(entry, req.method()) {
            Ok(Requirement::Nothing) => return Admission::Pass((None, None)),
            Ok(requirement) => requirement.scope(),
            Err(rejection) => return refused(rejection),
        };
        // Records are guarded: a disabled span would still format them for `log` (see `span`).
        let traced = !span.is_disabled();
        if let (true, Some(scope)) = (traced, &scope) {
            span.record("scope", tracing::field::display(scope));
        }
        let found = match self.intake.take(req) {
            Ok(Some(found)) => found,
            Ok(None) => return Admission::Pass((None, None)),
            Err(rejection) => return Admission::Reject(rejection),
        };
        let presented = PresentedKey::new(&found.key);
        let verification = self.verifier.verify_now(&presented);
        if traced {
            span.record("cache", if verification.is_some() { "hit" } else { "miss" });
        }
        // The raw key outlives this borrow only where something needs it: the async verifier, or a
        // usage sink that reports by key. The SHA-256 is computed only on a miss.
        let needs_key = self.enforce.metering.needs_key();
        let raw = (verification.is_none() || needs_key).then(|| presented.to_owned_key());
        let miss = verification.is_none().then(|| *presented.digest());
        let source = found.source;
        self.intake.hide(source, req);
        let Some(verification) = verification else {
            let (key, digest) = (raw.expect("kept for the verifier"), miss.expect("hashed on a miss"));
            return Admission::Pending(self.verify_later(key, digest, scope, entry, span.clone()));
        };
        match self.decide.decide(verification, scope.as_ref(), SystemTime::now) {
            Ok(key) => self.enforce.enforce(key, entry, raw, None),
            Err(rejection) => Admission::Reject(rejection),
        }
    }

    fn verify_later(
        self: &Arc<Self>,
        key: ApiKey,
        digest: KeyDigest,
        scope: Option<RequiredScope>,
        entry: &Arc<RouteEntry>,
        span: Span,
    ) -> BoxFuture<'static, Result<Passed, Rejection>> {
        let raw = self.enforce.metering.needs_key().then(|| key.clone());
        let mut request = VerifyRequest::hashed(digest, key);
        request.scope = scope.clone();
        request.route = entry.template.clone();
        request.usage = entry.policy.usage.clone();
        request.rate_limit = entry.policy.limits.first().cloned();
        let verification = self.verifier.verify(request);
        let (gate, entry) = (Arc::clone(self), Arc::clone(entry));
        Box::pin(async move {
            let verdict = gate.settle(verification.await, scope, &entry, raw).await;
            count(&verdict.as_ref().map(|(key, _)| key.as_ref()), &entry, &span);
            verdict
        })
    }

    /// What a verifier's late answer (or failure) makes of the request.
    async fn settle(
        &self,
        verification: Result<Verification, VerifyError>,
        scope: Option<RequiredScope>,
        entry: &Arc<RouteEntry>,
        raw: Option<ApiKey>,
    ) -> Result<Passed, Rejection> {
        let on_error = &self.unverifiable;
        let verification = match verification {
            Ok(verification) => {
                // A stale answer means the verifier is still failing.
                if !verification.stale {
                    on_error.outage.recovered();
                }
                verification
            }
            Err(error) if on_error.fail_open => {
                on_error.fail_open_count.fetch_add(1, Ordering::Relaxed);
                on_error.outage.failed(&error);
                return Ok((Some(VerifiedKey::fail_open(&self.responder)), None));
            }
            Err(error) => {
                on_error.outage.failed(&error);
                return Err(match error.retry_after() {
                    Some(retry_after) => Rejection::Unavailable { retry_after },
                    None => self.decide.refusals.unavailable(),
                });
            }
        };
        // Per-request Oneloop counted the route's usage and its first limit already.
        let counted = verification.counted.then_some(verification.rate_limit);
        let key = self.decide.decide(verification, scope.as_ref(), SystemTime::now)?;
        match self.enforce.enforce(key, entry, raw, counted) {
            Admission::Pass(passed) => Ok(passed),
            Admission::Reject(rejection) => Err(rejection),
            Admission::Pending(limits) => limits.await,
        }
    }

    /// Puts what the gate learnt into the request for the inner service: the verified key, or a
    /// mark that a gate let it through without one.
    pub(crate) fn hand_over<B>(&self, req: &mut Request<B>, key: Option<VerifiedKey>) {
        let extensions = req.extensions_mut();
        match key {
            Some(key) => drop(extensions.insert(key)),
            None => drop(extensions.insert(Gated(Arc::clone(&self.responder)))),
        }
    }

    /// The responder's response, with the rate-limit headers of a `429`.
    pub(crate) fn respond(&self, rejection: &Rejection) -> Response<Bytes> {
        let mut response = self.responder.respond(rejection);
        if let Some(headers) = enforce::refused_headers(self.enforce.header_style, rejection) {
            headers.insert_into(response.headers_mut());
        }
        response
    }
}

/// Counts a decision: a pass with a key, without one (nothing required), let through unverified,
/// or a refusal by its cause.
#[inline]
fn count(verdict: &Result<Option<&VerifiedKey>, &Rejection>, entry: &RouteEntry, span: &Span) {
    let (kind, outcome, cause) = match verdict {
        Ok(Some(key)) if key.is_fail_open() => (0, "fail_open", "unavailable"),
        Ok(Some(_)) => (1, "pass", "key"),
        Ok(None) => (2, "pass", "public"),
        Err(rejection) => (3 + rejection.ordinal(), "refused", rejection.slug()),
    };
    entry.decisions.count(kind, outcome, cause, entry.template.as_ref());
    if !span.is_disabled() {
        span.record("outcome", outcome);
        span.record("cause", cause);
        span.record("route", entry.template.as_deref().unwrap_or("other"));
        if let Ok(Some(key)) = verdict {
            span.record("key_id", key.id());
        }
    }
}

const _: () = assert!(3 + Rejection::CAUSES <= observe::DECISION_KINDS, "a decision kind per cause");

fn refused(rejection: Rejection) -> Admission {
    tracing::debug!(%rejection, "keygate: refused");
    Admission::Reject(rejection)
}

#[cfg(feature = "axum")]
fn matched_path<B>(req: &Request<B>) -> Option<&str> {
    req.extensions().get::<axum::extract::MatchedPath>().map(|m| m.as_str())
}

#[cfg(not(feature = "axum"))]
fn matched_path<B>(_: &Request<B>) -> Option<&str> {
    None
}
