use std::fmt;
use std::hash::Hash;
use std::task::{Context, Poll};

use tower::{BoxError, Service};

use super::PeerRateLimiter;
use super::limiter::Checker;
use super::table::at_arrival;
use crate::future::ResponseFuture;
use crate::targets::LISTENER;
use crate::{Datagram, DropReason};

/// Drops datagrams from peers over their quota; see the [module docs](super).
///
/// # Example
///
/// ```
/// use abyss_middleware::rate_limit::PeerRateLimit;
/// use abyss_middleware::{DropReason, PeerRateLimiter, RateQuota, drop_reason};
/// use tower::{Service, ServiceExt};
/// # #[derive(Debug)] struct Req;
/// # impl abyss_middleware::Datagram for Req {
/// #     fn peer(&self) -> std::net::SocketAddr { ([192, 0, 2, 1], 1).into() }
/// #     fn local(&self) -> std::net::SocketAddr { ([192, 0, 2, 2], 2).into() }
/// #     fn payload_len(&self) -> usize { 0 }
/// # }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let limiter = PeerRateLimiter::new(RateQuota::per_second(1)).unwrap();
/// let inner = tower::service_fn(|_: Req| async { Ok::<_, std::convert::Infallible>("ok") });
/// let mut service = PeerRateLimit::new(inner, limiter.clone());
///
/// assert_eq!(service.ready().await.unwrap().call(Req).await.unwrap(), "ok");
/// let again = service.ready().await.unwrap().call(Req).await;
/// assert_eq!(drop_reason(&*again.unwrap_err()), Some(DropReason::RateLimited));
/// assert_eq!(limiter.stats().limited, 1);
/// # }
/// ```
pub struct PeerRateLimit<S, K = std::net::IpAddr> {
    inner: S,
    limiter: PeerRateLimiter<K>,
    /// The limiter in force when last looked at, so that the common path
    /// takes no lock: a quota change bumps the generation.
    generation: u64,
    governor: Checker<K>,
}

impl<S: Clone, K> Clone for PeerRateLimit<S, K> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            limiter: self.limiter.clone(),
            generation: self.generation,
            governor: self.governor.clone(),
        }
    }
}

impl<S: fmt::Debug, K> fmt::Debug for PeerRateLimit<S, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerRateLimit")
            .field("inner", &self.inner)
            .field("limiter", &self.limiter)
            .finish()
    }
}

impl<S, K: Hash + Eq + Clone + Send + Sync + 'static> PeerRateLimit<S, K> {
    /// Wraps `inner` with `limiter`.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::rate_limit::PeerRateLimit;
    /// use abyss_middleware::{PeerRateLimiter, RateQuota};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let limiter = PeerRateLimiter::new(RateQuota::per_second(100)).unwrap();
    /// let service = PeerRateLimit::new(
    ///     tower::service_fn(|_: ()| async { Ok::<_, std::convert::Infallible>(()) }),
    ///     limiter,
    /// );
    /// # let _ = service;
    /// # }
    /// ```
    pub fn new(inner: S, limiter: PeerRateLimiter<K>) -> Self {
        let (generation, governor) = limiter.governor();
        Self {
            inner,
            limiter,
            generation,
            governor,
        }
    }

    /// The limiter, for its quota and counters.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::{PeerRateLimiter, RateQuota};
    /// use tower::Layer;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let limiter = PeerRateLimiter::new(RateQuota::per_second(100)).unwrap();
    /// let service = limiter.layer().layer(());
    /// assert_eq!(service.limiter().quota(), RateQuota::per_second(100));
    /// # }
    /// ```
    pub fn limiter(&self) -> &PeerRateLimiter<K> {
        &self.limiter
    }
}

impl<S, K> PeerRateLimit<S, K> {
    /// The wrapped service.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::{PeerRateLimiter, RateQuota};
    /// use tower::Layer;
    ///
    /// let limiter = PeerRateLimiter::new(RateQuota::per_second(100)).unwrap();
    /// let service = limiter.layer().layer(String::from("inner"));
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
    /// use abyss_middleware::{PeerRateLimiter, RateQuota};
    /// use tower::Layer;
    ///
    /// let limiter = PeerRateLimiter::new(RateQuota::per_second(100)).unwrap();
    /// let mut service = limiter.layer().layer(vec![1]);
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
    /// use abyss_middleware::{PeerRateLimiter, RateQuota};
    /// use tower::Layer;
    ///
    /// let limiter = PeerRateLimiter::new(RateQuota::per_second(100)).unwrap();
    /// let service = limiter.layer().layer(String::from("inner"));
    /// assert_eq!(service.into_inner(), "inner");
    /// ```
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, K, R> Service<R> for PeerRateLimit<S, K>
where
    S: Service<R>,
    S::Error: Into<BoxError>,
    K: Hash + Eq + Clone + Send + Sync + 'static,
    R: Datagram,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: R) -> Self::Future {
        if self.limiter.generation() != self.generation {
            (self.generation, self.governor) = self.limiter.governor();
        }
        let peer = request.peer();
        let key = (self.limiter.shared.key)(peer);
        let arrival = tokio::time::Instant::from_std(request.received_at());
        if !at_arrival(arrival, || self.governor.check(&key)) {
            tracing::debug!(target: LISTENER, peer = %peer, "rate_limit_exceeded");
            return ResponseFuture::rejected(DropReason::RateLimited);
        }
        ResponseFuture::inner(self.inner.call(request))
    }
}
