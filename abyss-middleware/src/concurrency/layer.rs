use tower::Layer;

use super::ConcurrencyShed;

/// Applies [`ConcurrencyShed`]: at most `max` requests in flight, the rest
/// dropped; see the [module docs](super).
///
/// Each service this layer wraps has its own counter, shared by that
/// service's clones (a server's listeners clone one service, so the limit is
/// server-wide).
///
/// # Example
///
/// ```
/// use abyss_middleware::ConcurrencyShedLayer;
/// use tower::ServiceBuilder;
///
/// let service = ServiceBuilder::new()
///     .layer(ConcurrencyShedLayer::new(1024))
///     .service_fn(|_: ()| async { Ok::<_, std::convert::Infallible>(()) });
/// assert_eq!(service.in_flight(), 0);
/// ```
#[derive(Debug, Clone, Copy)]
pub struct ConcurrencyShedLayer {
    max: usize,
}

impl ConcurrencyShedLayer {
    /// At most `max` requests in flight.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::ConcurrencyShedLayer;
    /// use tower::Layer;
    ///
    /// let layer = ConcurrencyShedLayer::new(64);
    /// // Each service the layer wraps has a counter of its own.
    /// let a = layer.layer(());
    /// let b = layer.layer(());
    /// assert_eq!((a.in_flight(), b.in_flight()), (0, 0));
    /// ```
    pub fn new(max: usize) -> Self {
        Self { max }
    }
}

impl<S> Layer<S> for ConcurrencyShedLayer {
    type Service = ConcurrencyShed<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ConcurrencyShed::new(inner, self.max)
    }
}
