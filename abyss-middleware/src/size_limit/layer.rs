use tower::Layer;

use super::SizeLimit;

/// Applies [`SizeLimit`]: datagrams longer than `max_bytes` are dropped.
///
/// # Example
///
/// ```
/// use abyss_middleware::SizeLimitLayer;
/// use tower::ServiceBuilder;
/// # #[derive(Debug)] struct Req;
/// # impl abyss_middleware::Datagram for Req {
/// #     fn peer(&self) -> std::net::SocketAddr { ([192, 0, 2, 1], 1).into() }
/// #     fn local(&self) -> std::net::SocketAddr { ([192, 0, 2, 2], 2).into() }
/// #     fn payload_len(&self) -> usize { 0 }
/// # }
///
/// let service = ServiceBuilder::new()
///     .layer(SizeLimitLayer::new(512)) // DNS over UDP without EDNS
///     .service_fn(|_: Req| async { Ok::<_, std::convert::Infallible>(()) });
/// # let _ = service;
/// ```
#[derive(Debug, Clone, Copy)]
pub struct SizeLimitLayer {
    max_bytes: usize,
}

impl SizeLimitLayer {
    /// Payloads of more than `max_bytes` are dropped; `max_bytes` itself
    /// passes.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::SizeLimitLayer;
    /// use tower::Layer;
    ///
    /// let service = SizeLimitLayer::new(1232).layer(());
    /// assert_eq!(service.max_bytes(), 1232);
    /// ```
    pub fn new(max_bytes: usize) -> Self {
        Self { max_bytes }
    }
}

impl<S> Layer<S> for SizeLimitLayer {
    type Service = SizeLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SizeLimit::new(inner, self.max_bytes)
    }
}
