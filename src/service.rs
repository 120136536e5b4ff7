//! [`ApiKeyService`]: the `Service` the layer wraps around yours.

use crate::future::ResponseFuture;
use crate::gate::{Admission, Gate};
use bytes::Bytes;
use http::{Request, Response};
use std::sync::Arc;
use std::task::{Context, Poll};
use tower_service::Service;

#[doc = include_str!("../docs/api_key_service.md")]
#[derive(Clone)]
pub struct ApiKeyService<S> {
    inner: S,
    gate: Arc<Gate>,
}

impl<S> ApiKeyService<S> {
    pub(crate) fn new(inner: S, gate: Arc<Gate>) -> Self {
        Self { inner, gate }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for ApiKeyService<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone,
    ResB: From<Bytes>,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
        let span = Gate::span();
        match self.gate.admit(&mut req, &span) {
            Admission::Pass((key, headers)) => {
                self.gate.hand_over(&mut req, key);
                // The inner service runs inside the gate's span, so its events carry the verdict.
                // A span nobody records is skipped outright: entering even a disabled one costs a
                // check of `log`'s level per request.
                let future =
                    if span.is_disabled() { self.inner.call(req) } else { span.in_scope(|| self.inner.call(req)) };
                ResponseFuture::called(future, headers, span)
            }
            Admission::Reject(rejection) => ResponseFuture::rejected(self.gate.respond(&rejection)),
            Admission::Pending(verdict) => {
                // The inner service is called later: take the one that was made ready and leave a
                // clone in its place (tower's `mem::replace` rule).
                let clone = self.inner.clone();
                let ready = std::mem::replace(&mut self.inner, clone);
                ResponseFuture::pending(verdict, req, ready, self.gate.clone(), span)
            }
        }
    }
}

impl<S: std::fmt::Debug> std::fmt::Debug for ApiKeyService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeyService").field("inner", &self.inner).finish_non_exhaustive()
    }
}
