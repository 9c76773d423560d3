use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use tower::Layer;

use super::ConcurrencyLimit;

/// Applies [`ConcurrencyLimit`]: at most `max` requests in flight, the rest
/// dropped; see the [module docs](super).
///
/// Each service this layer wraps has its own counter, shared by that
/// service's clones (a server's listeners clone one service, so the limit is
/// server-wide).
///
/// # Example
///
/// ```
/// use abyss_middleware::ConcurrencyLimitLayer;
/// use tower::ServiceBuilder;
///
/// let service = ServiceBuilder::new()
///     .layer(ConcurrencyLimitLayer::new(1024))
///     .service_fn(|_: ()| async { Ok::<_, std::convert::Infallible>(()) });
/// assert_eq!(service.in_flight(), 0);
/// ```
#[derive(Debug, Clone, Copy)]
pub struct ConcurrencyLimitLayer {
    max: usize,
}

impl ConcurrencyLimitLayer {
    /// At most `max` requests in flight.
    pub fn new(max: usize) -> Self {
        Self { max }
    }
}

impl<S> Layer<S> for ConcurrencyLimitLayer {
    type Service = ConcurrencyLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ConcurrencyLimit::with_counter(inner, self.max, Arc::new(AtomicUsize::new(0)))
    }
}
