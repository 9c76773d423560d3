use tower::Layer;

use super::{DefaultMakeSpan, DefaultOnFailure, DefaultOnReply, DefaultOnRequest, Trace};

/// Applies [`Trace`]: a span per datagram and hooks; see the
/// [module docs](super).
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use abyss_middleware::TraceLayer;
/// use tower::ServiceBuilder;
/// use tracing::Span;
/// # #[derive(Debug)] struct Req;
/// # impl abyss_middleware::Datagram for Req {
/// #     fn peer(&self) -> std::net::SocketAddr { ([192, 0, 2, 1], 1).into() }
/// #     fn local(&self) -> std::net::SocketAddr { ([192, 0, 2, 2], 2).into() }
/// #     fn payload_len(&self) -> usize { 0 }
/// # }
///
/// let service = ServiceBuilder::new()
///     .layer(
///         TraceLayer::new()
///             .make_span_with(|_: &Req| tracing::info_span!("dns"))
///             .on_reply(|_: &(), latency: Duration, _: &Span| {
///                 tracing::info!(ms = latency.as_millis() as u64, "answered");
///             }),
///     )
///     .service_fn(|_: Req| async { Ok::<_, std::convert::Infallible>(()) });
/// # let _ = service;
/// ```
#[derive(Debug, Clone, Copy)]
pub struct TraceLayer<
    M = DefaultMakeSpan,
    Req = DefaultOnRequest,
    Rep = DefaultOnReply,
    Fail = DefaultOnFailure,
> {
    pub(super) make_span: M,
    pub(super) on_request: Req,
    pub(super) on_reply: Rep,
    pub(super) on_failure: Fail,
}

impl Default for TraceLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl TraceLayer {
    /// The defaults: a `DEBUG` span per datagram, replies and failures logged.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::TraceLayer;
    /// use tower::Layer;
    ///
    /// let service = TraceLayer::new().layer(tower::service_fn(|_: ()| async { Ok::<_, std::convert::Infallible>(()) }));
    /// # let _ = service;
    /// ```
    pub fn new() -> Self {
        Self {
            make_span: DefaultMakeSpan::new(),
            on_request: DefaultOnRequest,
            on_reply: DefaultOnReply,
            on_failure: DefaultOnFailure,
        }
    }
}

impl<M, Req, Rep, Fail> TraceLayer<M, Req, Rep, Fail> {
    /// Makes spans with `make_span` (a [`MakeSpan`](super::MakeSpan), for
    /// example a closure or [`DefaultMakeSpan::level`]).
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::TraceLayer;
    /// # #[derive(Debug)] struct Req;
    /// # impl abyss_middleware::Datagram for Req {
    /// #     fn peer(&self) -> std::net::SocketAddr { ([192, 0, 2, 1], 1).into() }
    /// #     fn local(&self) -> std::net::SocketAddr { ([192, 0, 2, 2], 2).into() }
    /// #     fn payload_len(&self) -> usize { 0 }
    /// # }
    ///
    /// let layer = TraceLayer::new().make_span_with(|_: &Req| tracing::info_span!("syslog"));
    /// # let _ = layer;
    /// ```
    pub fn make_span_with<M2>(self, make_span: M2) -> TraceLayer<M2, Req, Rep, Fail> {
        TraceLayer {
            make_span,
            on_request: self.on_request,
            on_reply: self.on_reply,
            on_failure: self.on_failure,
        }
    }

    /// Calls `on_request` for each datagram (`()` for nothing).
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::TraceLayer;
    /// use tracing::Span;
    /// # #[derive(Debug)] struct Req;
    /// # impl abyss_middleware::Datagram for Req {
    /// #     fn peer(&self) -> std::net::SocketAddr { ([192, 0, 2, 1], 1).into() }
    /// #     fn local(&self) -> std::net::SocketAddr { ([192, 0, 2, 2], 2).into() }
    /// #     fn payload_len(&self) -> usize { 0 }
    /// # }
    ///
    /// let layer = TraceLayer::new().on_request(|_: &Req, _: &Span| tracing::debug!("received"));
    /// # let _ = layer;
    /// ```
    pub fn on_request<Req2>(self, on_request: Req2) -> TraceLayer<M, Req2, Rep, Fail> {
        TraceLayer {
            make_span: self.make_span,
            on_request,
            on_reply: self.on_reply,
            on_failure: self.on_failure,
        }
    }

    /// Calls `on_reply` for each response (`()` for nothing).
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use abyss_middleware::TraceLayer;
    /// use tracing::Span;
    ///
    /// let layer = TraceLayer::new().on_reply(|_: &(), latency: Duration, _: &Span| {
    ///     tracing::info!(ms = latency.as_millis() as u64, "answered");
    /// });
    /// # let _ = layer;
    /// ```
    pub fn on_reply<Rep2>(self, on_reply: Rep2) -> TraceLayer<M, Req, Rep2, Fail> {
        TraceLayer {
            make_span: self.make_span,
            on_request: self.on_request,
            on_reply,
            on_failure: self.on_failure,
        }
    }

    /// Calls `on_failure` for each error (`()` for nothing).
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use abyss_middleware::TraceLayer;
    /// use tracing::Span;
    ///
    /// let layer = TraceLayer::new().on_failure(|error: &tower::BoxError, _: Duration, _: &Span| {
    ///     tracing::error!(%error, "failed");
    /// });
    /// # let _ = layer;
    /// ```
    pub fn on_failure<Fail2>(self, on_failure: Fail2) -> TraceLayer<M, Req, Rep, Fail2> {
        TraceLayer {
            make_span: self.make_span,
            on_request: self.on_request,
            on_reply: self.on_reply,
            on_failure,
        }
    }
}

impl<S, M: Clone, Req: Clone, Rep: Clone, Fail: Clone> Layer<S> for TraceLayer<M, Req, Rep, Fail> {
    type Service = Trace<S, M, Req, Rep, Fail>;

    fn layer(&self, inner: S) -> Self::Service {
        Trace {
            inner,
            make_span: self.make_span.clone(),
            on_request: self.on_request.clone(),
            on_reply: self.on_reply.clone(),
            on_failure: self.on_failure.clone(),
        }
    }
}
