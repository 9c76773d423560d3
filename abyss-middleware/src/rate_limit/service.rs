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
    pub fn limiter(&self) -> &PeerRateLimiter<K> {
        &self.limiter
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
