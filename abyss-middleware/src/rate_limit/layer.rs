use std::hash::Hash;

use tower::Layer;

use super::{PeerRateLimit, PeerRateLimiter};

/// Applies a [`PeerRateLimiter`]; made by [`PeerRateLimiter::layer`].
///
/// # Example
///
/// ```
/// use abyss_middleware::{PeerRateLimiter, RateQuota};
/// use tower::ServiceBuilder;
/// # #[derive(Debug)] struct Req;
/// # impl abyss_middleware::Datagram for Req {
/// #     fn peer(&self) -> std::net::SocketAddr { ([192, 0, 2, 1], 1).into() }
/// #     fn local(&self) -> std::net::SocketAddr { ([192, 0, 2, 2], 2).into() }
/// #     fn payload_len(&self) -> usize { 0 }
/// # }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let limiter = PeerRateLimiter::new(RateQuota::per_second(1000)).unwrap();
/// let service = ServiceBuilder::new()
///     .layer(limiter.layer())
///     .service_fn(|_: Req| async { Ok::<_, std::convert::Infallible>(()) });
/// # let _ = service;
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct PeerRateLimitLayer<K = std::net::IpAddr> {
    limiter: PeerRateLimiter<K>,
}

impl<K> PeerRateLimitLayer<K> {
    pub(super) fn from_limiter(limiter: PeerRateLimiter<K>) -> Self {
        Self { limiter }
    }
}

impl<S, K: Hash + Eq + Clone + Send + Sync + 'static> Layer<S> for PeerRateLimitLayer<K> {
    type Service = PeerRateLimit<S, K>;

    fn layer(&self, inner: S) -> Self::Service {
        PeerRateLimit::new(inner, self.limiter.clone())
    }
}
