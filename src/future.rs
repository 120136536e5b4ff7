//! [`ResponseFuture`]: the inner service's future, a ready rejection, or a verification in flight.

use crate::boxed::BoxFuture;
use crate::gate::{Gate, Passed};
use crate::limit::RateLimitHeaders;
use crate::reject::Rejection;
use bytes::Bytes;
use http::{Request, Response};
use pin_project_lite::pin_project;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tower_service::Service;
use tracing::Span;

pin_project! {
    /// The response future of [`ApiKeyService`](crate::ApiKeyService).
    pub struct ResponseFuture<S, ReqB>
    where
        S: Service<Request<ReqB>>,
    {
        #[pin]
        state: State<S, ReqB>,
        // The gate's span, entered while the verdict or the inner service is polled.
        span: Span,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, ReqB>
    where
        S: Service<Request<ReqB>>,
    {
        Called { #[pin] future: S::Future, headers: Option<RateLimitHeaders> },
        Rejected { response: Option<Response<Bytes>> },
        Verifying {
            verdict: BoxFuture<'static, Result<Passed, Rejection>>,
            waiting: Option<(Request<ReqB>, S)>,
            gate: Arc<Gate>,
        },
    }
}

impl<S: Service<Request<ReqB>>, ReqB> ResponseFuture<S, ReqB> {
    pub(crate) fn called(future: S::Future, headers: Option<RateLimitHeaders>, span: Span) -> Self {
        Self { state: State::Called { future, headers }, span }
    }

    pub(crate) fn rejected(response: Response<Bytes>) -> Self {
        Self { state: State::Rejected { response: Some(response) }, span: Span::none() }
    }

    pub(crate) fn pending(
        verdict: BoxFuture<'static, Result<Passed, Rejection>>,
        req: Request<ReqB>,
        inner: S,
        gate: Arc<Gate>,
        span: Span,
    ) -> Self {
        Self { state: State::Verifying { verdict, waiting: Some((req, inner)), gate }, span }
    }
}

impl<S, ReqB, ResB> Future for ResponseFuture<S, ReqB>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    ResB: From<Bytes>,
{
    type Output = Result<Response<ResB>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let _entered = (!this.span.is_disabled()).then(|| this.span.enter());
        loop {
            let next = match this.state.as_mut().project() {
                StateProj::Called { future, headers } => {
                    let mut res = ready!(future.poll(cx))?;
                    if let Some(headers) = headers.take() {
                        headers.insert_into(res.headers_mut());
                    }
                    return Poll::Ready(Ok(res));
                }
                StateProj::Rejected { response } => {
                    let response = response.take().expect("ResponseFuture polled after completion");
                    return Poll::Ready(Ok(response.map(ResB::from)));
                }
                StateProj::Verifying { verdict, waiting, gate } => {
                    let verdict = ready!(verdict.as_mut().poll(cx));
                    let (mut req, mut inner) = waiting.take().expect("ResponseFuture polled after completion");
                    match verdict {
                        Ok((key, headers)) => {
                            gate.hand_over(&mut req, key);
                            State::Called { future: inner.call(req), headers }
                        }
                        Err(rejection) => State::Rejected { response: Some(gate.respond(&rejection)) },
                    }
                }
            };
            this.state.set(next);
        }
    }
}

impl<S: Service<Request<ReqB>>, ReqB> std::fmt::Debug for ResponseFuture<S, ReqB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
