use std::task::{Context, Poll};

use tokio::time::Instant;
use tower::{BoxError, Service};

use super::{
    DefaultMakeSpan, DefaultOnFailure, DefaultOnReply, DefaultOnRequest, MakeSpan, OnFailure,
    OnReply, OnRequest, ResponseFuture,
};

/// Runs each request in its own span, calling the hooks; see the
/// [module docs](super).
#[derive(Debug, Clone, Copy)]
pub struct Trace<
    S,
    M = DefaultMakeSpan,
    Req = DefaultOnRequest,
    Rep = DefaultOnReply,
    Fail = DefaultOnFailure,
> {
    pub(super) inner: S,
    pub(super) make_span: M,
    pub(super) on_request: Req,
    pub(super) on_reply: Rep,
    pub(super) on_failure: Fail,
}

impl<S, R, M, Req, Rep, Fail> Service<R> for Trace<S, M, Req, Rep, Fail>
where
    S: Service<R>,
    S::Error: Into<BoxError>,
    R: crate::Datagram,
    M: MakeSpan<R>,
    Req: OnRequest<R>,
    Rep: OnReply<S::Response> + Clone,
    Fail: OnFailure + Clone,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, Rep, Fail>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: R) -> Self::Future {
        let span = self.make_span.make_span(&request);
        let start = Instant::from_std(request.received_at());
        let future = {
            let _entered = span.enter();
            self.on_request.on_request(&request, &span);
            self.inner.call(request)
        };
        ResponseFuture::new(
            future,
            span,
            start,
            self.on_reply.clone(),
            self.on_failure.clone(),
        )
    }
}
