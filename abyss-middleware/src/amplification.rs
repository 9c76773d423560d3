//! Caps reply size for peers not yet validated, so a spoofed source cannot
//! turn the server into an amplifier.
//!
//! A UDP server answers whoever the source address says sent the datagram;
//! an attacker who forges a victim's address gets the server to send the
//! victim replies larger than the requests (DNS, NTP and memcached
//! reflection attacks). Like QUIC before address validation, this layer
//! lets a reply to a peer that has not been validated be at most `factor`
//! times the request's size (3 by default); a larger reply is dropped,
//! counted as `amplification` and traced as `amplification_limited`.
//!
//! What validates a peer is the service's business (a session that
//! completed a handshake, a cookie, an allow list): give a [`Validate`]
//! (any `Fn(SocketAddr) -> bool`) to
//! [`AmplificationGuardLayer::validated_by`]. Without one, every peer is
//! capped.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use tower::{BoxError, Layer, Service};

use crate::targets::LISTENER;
use crate::{Datagram, DropReason, IntoReply};

/// Decides whether a peer has proven it owns its address.
pub trait Validate: Send + Sync + 'static {
    /// Whether replies to `peer` may be of any size.
    fn is_validated(&self, peer: SocketAddr) -> bool;
}

impl<F: Fn(SocketAddr) -> bool + Send + Sync + 'static> Validate for F {
    fn is_validated(&self, peer: SocketAddr) -> bool {
        self(peer)
    }
}

/// Applies the amplification guard; see the [module docs](self).
///
/// # Example
///
/// ```
/// use abyss_middleware::AmplificationGuardLayer;
/// use tower::ServiceBuilder;
/// # #[derive(Debug)] struct Req;
/// # impl abyss_middleware::Datagram for Req {
/// #     fn peer(&self) -> std::net::SocketAddr { ([192, 0, 2, 1], 1).into() }
/// #     fn local(&self) -> std::net::SocketAddr { ([192, 0, 2, 2], 2).into() }
/// #     fn payload_len(&self) -> usize { 0 }
/// # }
///
/// let trusted: std::net::IpAddr = "192.0.2.10".parse().unwrap();
/// let service = ServiceBuilder::new()
///     .layer(AmplificationGuardLayer::new(3).validated_by(move |peer: std::net::SocketAddr| peer.ip() == trusted))
///     .service_fn(|_: Req| async { Ok::<_, std::convert::Infallible>(bytes::Bytes::new()) });
/// # let _ = service;
/// ```
#[derive(Clone)]
pub struct AmplificationGuardLayer {
    factor: usize,
    validate: Option<Arc<dyn Validate>>,
}

impl fmt::Debug for AmplificationGuardLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmplificationGuardLayer")
            .field("factor", &self.factor)
            .field("validate", &self.validate.is_some())
            .finish()
    }
}

impl Default for AmplificationGuardLayer {
    fn default() -> Self {
        Self::new(3)
    }
}

impl AmplificationGuardLayer {
    /// Replies to unvalidated peers may be at most `factor` times the
    /// request's size.
    pub fn new(factor: usize) -> Self {
        Self {
            factor,
            validate: None,
        }
    }

    /// Peers `validate` accepts are not capped.
    pub fn validated_by(mut self, validate: impl Validate) -> Self {
        self.validate = Some(Arc::new(validate));
        self
    }
}

impl<S> Layer<S> for AmplificationGuardLayer {
    type Service = AmplificationGuard<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AmplificationGuard {
            inner,
            factor: self.factor,
            validate: self.validate.clone(),
        }
    }
}

/// A service whose replies to unvalidated peers are capped; see the
/// [module docs](self).
#[derive(Clone)]
pub struct AmplificationGuard<S> {
    inner: S,
    factor: usize,
    validate: Option<Arc<dyn Validate>>,
}

impl<S: fmt::Debug> fmt::Debug for AmplificationGuard<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmplificationGuard")
            .field("inner", &self.inner)
            .field("factor", &self.factor)
            .finish_non_exhaustive()
    }
}

impl<S, R> Service<R> for AmplificationGuard<S>
where
    S: Service<R>,
    S::Response: IntoReply,
    S::Error: Into<BoxError>,
    R: Datagram,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = GuardFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: R) -> Self::Future {
        let peer = request.peer();
        let validated = self.validate.as_ref().is_some_and(|v| v.is_validated(peer));
        let limit = (!validated).then(|| request.payload_len().saturating_mul(self.factor));
        GuardFuture {
            inner: self.inner.call(request),
            limit,
            peer,
        }
    }
}

pin_project! {
    /// Response future of [`AmplificationGuard`].
    #[derive(Debug)]
    pub struct GuardFuture<F> {
        #[pin]
        inner: F,
        limit: Option<usize>,
        peer: SocketAddr,
    }
}

impl<F, T, E> Future for GuardFuture<F>
where
    F: Future<Output = Result<T, E>>,
    T: IntoReply,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx)).map_err(Into::into)?;
        if let Some(limit) = *this.limit {
            let size = response.reply_len();
            if size > limit {
                tracing::debug!(target: LISTENER, peer = %this.peer, size, limit, "amplification_limited");
                return Poll::Ready(Err(DropReason::Amplification.into_error()));
            }
        }
        Poll::Ready(Ok(response))
    }
}
