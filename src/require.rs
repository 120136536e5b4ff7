//! Per-route scope annotations: a small layer that checks the [`VerifiedKey`] the gate put in the
//! request's extensions.

use crate::context::{refuse_after_gate, Gated, VerifiedKey};
use crate::future::ResponseFuture;
use crate::reject::Rejection;
use crate::scope::{Action, RequiredScope};
use bytes::Bytes;
use http::{Request, Response};
use std::sync::Arc;
use std::task::{Context, Poll};
use tower_layer::Layer;
use tower_service::Service;

/// Requires the method's action on `representation` for the routes it wraps.
///
/// Use it with axum's `route_layer` (or on a single method router) *inside* a router that has an
/// [`ApiKeyLayer`](crate::ApiKeyLayer): the gate verifies the key, this checks the scope. Its
/// refusals go through the layer's responder. A request that reaches it without a verified key is
/// refused: `401` in optional mode, `500` where no gate ran at all (a wiring error), so a missing
/// gate fails closed.
///
/// ```
/// use axum::{routing::get, Router};
/// use keygate::{require, ApiKeyLayer, LocalVerifier};
///
/// let app: Router = Router::new()
///     .route("/v1/reports", get(|| async { "reports" }).route_layer(require("reports")))
///     .layer(ApiKeyLayer::new(LocalVerifier::in_memory()));
/// ```
#[must_use]
pub fn require(representation: &str) -> RequireLayer {
    RequireLayer { representation: representation.into(), action: None }
}

/// Requires exactly `action` on `representation`, whatever the method.
#[must_use]
pub fn require_scope(representation: &str, action: Action) -> RequireLayer {
    RequireLayer { representation: representation.into(), action: Some(action) }
}

#[doc = include_str!("../docs/require.md")]
#[derive(Debug, Clone)]
pub struct RequireLayer {
    representation: Arc<str>,
    action: Option<Action>,
}

impl<S> Layer<S> for RequireLayer {
    type Service = RequireService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequireService { inner, rule: self.clone() }
    }
}

#[doc = include_str!("../docs/require_service.md")]
#[derive(Debug, Clone)]
pub struct RequireService<S> {
    inner: S,
    rule: RequireLayer,
}

impl RequireLayer {
    fn check<B>(&self, req: &Request<B>) -> Result<(), Rejection> {
        let Some(key) = req.extensions().get::<VerifiedKey>() else {
            let gated = req.extensions().get::<Gated>().is_some();
            return Err(if gated { Rejection::MissingKey } else { Rejection::NotGated });
        };
        let action = self.action.or_else(|| Action::from_method(req.method())).ok_or(Rejection::UnmappedRoute)?;
        let required = RequiredScope { representation: self.representation.clone(), action };
        if required.granted_by(key.scopes()) {
            Ok(())
        } else {
            Err(Rejection::InsufficientScope(required))
        }
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for RequireService<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    ResB: From<Bytes>,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        match self.rule.check(&req) {
            Ok(()) => ResponseFuture::called(self.inner.call(req), None, tracing::Span::none()),
            Err(rejection) => ResponseFuture::rejected(refuse_after_gate(req.extensions(), &rejection)),
        }
    }
}
