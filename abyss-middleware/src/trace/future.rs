use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::BoxError;
use tracing::Span;

use super::{OnFailure, OnReply};

pin_project! {
    /// Response future of [`Trace`](super::Trace): polls the inner future
    /// inside the datagram's span and calls the reply or failure hook.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::TraceLayer;
    /// use abyss_middleware::trace::{DefaultOnFailure, DefaultOnReply, ResponseFuture};
    /// use tower::{Layer, Service};
    /// # #[derive(Debug)] struct Req;
    /// # impl abyss_middleware::Datagram for Req {
    /// #     fn peer(&self) -> std::net::SocketAddr { ([192, 0, 2, 1], 1).into() }
    /// #     fn local(&self) -> std::net::SocketAddr { ([192, 0, 2, 2], 2).into() }
    /// #     fn payload_len(&self) -> usize { 0 }
    /// # }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// type Inner = std::future::Ready<Result<&'static str, std::convert::Infallible>>;
    /// let mut service = TraceLayer::new().layer(tower::service_fn(|_: Req| std::future::ready(Ok("pong"))));
    /// let future: ResponseFuture<Inner, DefaultOnReply, DefaultOnFailure> = service.call(Req);
    /// assert_eq!(future.await.unwrap(), "pong");
    /// # }
    /// ```
    #[derive(Debug)]
    pub struct ResponseFuture<F, Rep, Fail> {
        #[pin]
        inner: F,
        span: Span,
        start: Instant,
        on_reply: Option<Rep>,
        on_failure: Option<Fail>,
    }
}

impl<F, Rep, Fail> ResponseFuture<F, Rep, Fail> {
    pub(super) fn new(
        inner: F,
        span: Span,
        start: Instant,
        on_reply: Rep,
        on_failure: Fail,
    ) -> Self {
        Self {
            inner,
            span,
            start,
            on_reply: Some(on_reply),
            on_failure: Some(on_failure),
        }
    }
}

impl<F, T, E, Rep, Fail> Future for ResponseFuture<F, Rep, Fail>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    Rep: OnReply<T>,
    Fail: OnFailure,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _entered = this.span.enter();
        let result = ready!(this.inner.poll(cx));
        let latency = this.start.elapsed();
        match result {
            Ok(response) => {
                if let Some(on_reply) = this.on_reply.take() {
                    on_reply.on_reply(&response, latency, this.span);
                }
                Poll::Ready(Ok(response))
            }
            Err(error) => {
                let error = error.into();
                if let Some(on_failure) = this.on_failure.take() {
                    on_failure.on_failure(&error, latency, this.span);
                }
                Poll::Ready(Err(error))
            }
        }
    }
}
