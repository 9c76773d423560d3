use std::task::{Context, Poll};

use tokio::time::Instant;
use tower::{BoxError, Service};

use super::{
    DefaultMakeSpan, DefaultOnFailure, DefaultOnReply, DefaultOnRequest, MakeSpan, OnFailure,
    OnReply, OnRequest, ResponseFuture,
};

/// Runs each request in its own span, calling the hooks; see the
/// [module docs](super).
///
/// Made by [`TraceLayer`](super::TraceLayer).
///
/// # Example
///
/// ```
/// use abyss_middleware::TraceLayer;
/// use tower::{Layer, Service, ServiceExt};
/// # #[derive(Debug)] struct Req;
/// # impl abyss_middleware::Datagram for Req {
/// #     fn peer(&self) -> std::net::SocketAddr { ([192, 0, 2, 1], 1).into() }
/// #     fn local(&self) -> std::net::SocketAddr { ([192, 0, 2, 2], 2).into() }
/// #     fn payload_len(&self) -> usize { 0 }
/// # }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let mut service = TraceLayer::new().layer(tower::service_fn(|_: Req| async {
///     tracing::info!("inside the datagram's span, with its peer");
///     Ok::<_, std::convert::Infallible>("pong")
/// }));
/// assert_eq!(service.ready().await.unwrap().call(Req).await.unwrap(), "pong");
/// # }
/// ```
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

impl<S, M, Req, Rep, Fail> Trace<S, M, Req, Rep, Fail> {
    /// The wrapped service.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::TraceLayer;
    /// use tower::Layer;
    ///
    /// let service = TraceLayer::new().layer(String::from("inner"));
    /// assert_eq!(service.get_ref(), "inner");
    /// ```
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::TraceLayer;
    /// use tower::Layer;
    ///
    /// let mut service = TraceLayer::new().layer(vec![1]);
    /// service.get_mut().push(2);
    /// assert_eq!(service.get_ref(), &[1, 2]);
    /// ```
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the service.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::TraceLayer;
    /// use tower::Layer;
    ///
    /// let service = TraceLayer::new().layer(String::from("inner"));
    /// assert_eq!(service.into_inner(), "inner");
    /// ```
    pub fn into_inner(self) -> S {
        self.inner
    }
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
