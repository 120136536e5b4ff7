//! The gate: one request's straight line, from key to verdict.
//!
//! `preflight? ─► route & scope ─► extract key ─► format check ─► verify (now, or later) ─► decide`

use crate::context::VerifiedKey;
use crate::extract::Extractor;
use crate::key::{ApiKey, KeyDigest, KeyFormat, Redacted};
use crate::reject::{Rejection, Responder};
use crate::scope::{Action, RequiredScope, Route, ScopeMap, Unmapped};
use crate::verify::{BoxFuture, KeyStatus, Verification, Verifier, VerifyRequest};
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
    pub(crate) responder: Box<dyn Responder>,
    pub(crate) unavailable_retry_after: Duration,
    pub(crate) fail_open: bool,
    /// Requests let through unverified by `fail_open`.
    pub(crate) fail_open_count: AtomicU64,
}

/// The gate's verdict on a request, as far as it can tell without waiting.
pub(crate) enum Admission {
    /// Let it through, with the verified key if there is one.
    Pass(Option<VerifiedKey>),
    /// Refuse it.
    Reject(Rejection),
    /// The verifier needs I/O: wait for this.
    Pending(BoxFuture<'static, Result<VerifiedKey, Rejection>>),
}

impl Gate {
    pub(crate) fn admit<B>(self: &Arc<Self>, req: &mut Request<B>) -> Admission {
        if self.allow_preflight && is_preflight(req) {
            return Admission::Pass(None);
        }
        let required = match self.required_scope(req) {
            Ok(Some(required)) => required,
            Ok(None) => return Admission::Pass(None),
            Err(rejection) => return self.refuse(rejection, None),
        };
        let found = match self.extractor.extract(req) {
            Ok(Some(found)) => found,
            Ok(None) if self.optional => return Admission::Pass(None),
            Ok(None) => return self.refuse(Rejection::MissingKey, None),
            Err(rejection) => return self.refuse(rejection, None),
        };
        if !self.format.accepts(&found.key) {
            return self.refuse(Rejection::InvalidKey(KeyStatus::Invalid), Some(&found.key));
        }
        let digest = KeyDigest::of(&found.key);
        let verdict = match self.verifier.verify_now(&digest) {
            Some(verification) => Ok(self.decide(verification, required.scope.as_ref())),
            None => Err(ApiKey::new(&*found.key)),
        };
        let source = found.source;
        if self.hide_credentials {
            self.extractor.hide(source, req);
        }
        match verdict {
            Ok(Ok(key)) => Admission::Pass(Some(key)),
            Ok(Err(rejection)) => Admission::Reject(rejection),
            Err(key) => Admission::Pending(self.verify_later(key, digest, required)),
        }
    }

    fn verify_later(
        self: &Arc<Self>,
        key: ApiKey,
        digest: KeyDigest,
        required: Required,
    ) -> BoxFuture<'static, Result<VerifiedKey, Rejection>> {
        let gate = Arc::clone(self);
        let mut request = VerifyRequest::hashed(digest, key);
        request.scope = required.scope.clone();
        request.route = required.template;
        let verification = self.verifier.verify(request);
        Box::pin(async move {
            match verification.await {
                Ok(verification) => gate.decide(verification, required.scope.as_ref()),
                Err(error) if gate.fail_open => {
                    gate.fail_open_count.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%error, "keygate: verifier failed; failing OPEN, request let through unverified");
                    Ok(VerifiedKey::fail_open())
                }
                Err(error) => {
                    tracing::warn!(%error, "keygate: verifier failed; refusing with 503");
                    Err(Rejection::Unavailable {
                        retry_after: error.retry_after().unwrap_or(gate.unavailable_retry_after),
                    })
                }
            }
        })
    }

    /// What the route asks: `Ok(None)` for a public route.
    fn required_scope<B>(&self, req: &Request<B>) -> Result<Option<Required>, Rejection> {
        let entry = self.routes.resolve(matched_path(req), req.uri().path())?;
        let template = entry.template.clone();
        let scope = match &entry.route {
            Route::Public => return Ok(None),
            Route::Resource(representation) => {
                let action = Action::from_method(req.method()).ok_or(Rejection::UnmappedRoute)?;
                Some(RequiredScope { representation: representation.clone(), action })
            }
            Route::Unmapped => match self.routes.unmapped_policy() {
                Unmapped::AnyValidKey => None,
                Unmapped::Deny => return Err(Rejection::UnmappedRoute),
            },
        };
        Ok(Some(Required { scope, template }))
    }

    /// The decision on a verifier's answer, made per request from the key's facts.
    fn decide(&self, verification: Verification, required: Option<&RequiredScope>) -> Result<VerifiedKey, Rejection> {
        let refused = match verification.status {
            KeyStatus::Valid => None,
            KeyStatus::InvalidScopes => {
                Some(required.cloned().map_or(Rejection::UnmappedRoute, Rejection::InsufficientScope))
            }
            KeyStatus::RateLimited => Some(Rejection::RateLimited { retry_after: retry_after(&verification) }),
            KeyStatus::UsageLimited => Some(Rejection::UsageLimited),
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

    pub(crate) fn respond(&self, rejection: &Rejection) -> Response<Bytes> {
        self.responder.respond(rejection)
    }
}

/// Until the verifier's reported reset, or a second when it reported none.
fn retry_after(verification: &Verification) -> Duration {
    let reset = verification.rate_limit.map(|r| r.reset_at.duration_since(SystemTime::now()).unwrap_or_default());
    reset.unwrap_or(Duration::from_secs(1))
}

/// What a non-public route asks: a scope (or none, for an unmapped route) and its template.
struct Required {
    scope: Option<RequiredScope>,
    template: Option<Arc<str>>,
}

fn is_preflight<B>(req: &Request<B>) -> bool {
    req.method() == Method::OPTIONS && req.headers().contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD)
}

#[cfg(feature = "axum")]
fn matched_path<B>(req: &Request<B>) -> Option<&str> {
    req.extensions().get::<axum::extract::MatchedPath>().map(|m| m.as_str())
}

#[cfg(not(feature = "axum"))]
fn matched_path<B>(_: &Request<B>) -> Option<&str> {
    None
}
