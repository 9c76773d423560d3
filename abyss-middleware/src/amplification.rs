//! Caps reply size for peers not yet validated, so a spoofed source cannot
//! turn the server into an amplifier.
//!
//! A UDP server answers whoever the source address says sent the datagram;
//! an attacker who forges a victim's address gets the server to send the
//! victim replies larger than the requests (DNS, NTP and memcached
//! reflection attacks). Like QUIC before address validation, this layer
//! lets a reply to a peer that has not been validated be at most `factor`
//! times the request's size (3 by default); a larger reply is dropped,
//! counted as `amplification` and traced as `reply_refused` (reason
//! `amplification`).
//!
//! What validates a peer is the service's business (a session that
//! completed a handshake, a cookie, an allow list): give a [`Validate`]
//! (any `Fn(SocketAddr) -> bool`) to
//! [`AmplificationGuardLayer::validated_by`]. Without one, every peer is
//! capped.
//!
//! # Example
//!
//! ```
//! use abyss_middleware::AmplificationGuardLayer;
//! use abyss_middleware::amplification::AmplificationGuard;
//! use tower::ServiceBuilder;
//! # #[derive(Debug)] struct Req;
//! # impl abyss_middleware::Datagram for Req {
//! #     fn peer(&self) -> std::net::SocketAddr { ([192, 0, 2, 1], 1).into() }
//! #     fn local(&self) -> std::net::SocketAddr { ([192, 0, 2, 2], 2).into() }
//! #     fn payload_len(&self) -> usize { 0 }
//! # }
//!
//! // A DNS server: answers of up to 3x the query to anyone, any size to the
//! // resolvers it knows.
//! let resolvers: Vec<std::net::IpAddr> = vec!["192.0.2.53".parse().unwrap()];
//! let service: AmplificationGuard<_> = ServiceBuilder::new()
//!     .layer(AmplificationGuardLayer::new(3).validated_by(move |peer: std::net::SocketAddr| {
//!         resolvers.contains(&peer.ip())
//!     }))
//!     .service_fn(|_: Req| async { Ok::<_, std::convert::Infallible>(Some(bytes::Bytes::new())) });
//! # let _ = service;
//! ```

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::{BoxError, Layer, Service};

use crate::future::ReplyRule;
use crate::{Datagram, IntoReply};

/// Decides whether a peer has proven it owns its address.
///
/// Any `Fn(SocketAddr) -> bool + Send + Sync + 'static` is one; implement
/// it for a type that keeps its own record of validated peers.
///
/// # Example
///
/// ```
/// use std::collections::HashSet;
/// use std::net::{IpAddr, SocketAddr};
/// use std::sync::{Arc, RwLock};
/// use abyss_middleware::{AmplificationGuardLayer, Validate};
///
/// /// Peers that completed a handshake.
/// #[derive(Clone, Default)]
/// struct Handshaken(Arc<RwLock<HashSet<IpAddr>>>);
///
/// impl Validate for Handshaken {
///     fn is_validated(&self, peer: SocketAddr) -> bool {
///         self.0.read().unwrap().contains(&peer.ip())
///     }
/// }
///
/// let handshaken = Handshaken::default();
/// let layer = AmplificationGuardLayer::new(3).validated_by(handshaken.clone());
/// # let _ = layer;
/// handshaken.0.write().unwrap().insert("192.0.2.1".parse().unwrap());
/// assert!(handshaken.is_validated("192.0.2.1:5000".parse().unwrap()));
/// ```
pub trait Validate: Send + Sync + 'static {
    /// Whether replies to `peer` may be of any size.
    ///
    /// # Example
    ///
    /// ```
    /// use std::net::SocketAddr;
    /// use abyss_middleware::Validate;
    ///
    /// let loopback = |peer: SocketAddr| peer.ip().is_loopback();
    /// assert!(loopback.is_validated("127.0.0.1:5000".parse().unwrap()));
    /// assert!(!loopback.is_validated("192.0.2.1:5000".parse().unwrap()));
    /// ```
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
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::AmplificationGuardLayer;
    ///
    /// // No larger than the request, as for a protocol that never needs more.
    /// let strict = AmplificationGuardLayer::new(1);
    /// # let _ = strict;
    /// ```
    pub fn new(factor: usize) -> Self {
        Self {
            factor,
            validate: None,
        }
    }

    /// Peers `validate` accepts are not capped.
    ///
    /// # Example
    ///
    /// ```
    /// use std::net::SocketAddr;
    /// use abyss_middleware::AmplificationGuardLayer;
    ///
    /// // Peers on the local network are trusted with any reply size.
    /// let layer = AmplificationGuardLayer::default()
    ///     .validated_by(|peer: SocketAddr| peer.ip().is_loopback());
    /// # let _ = layer;
    /// ```
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
///
/// # Example
///
/// ```
/// use abyss_middleware::{AmplificationGuardLayer, DropReason, drop_reason};
/// use tower::{Layer, Service, ServiceExt};
/// # #[derive(Debug)] struct Req(usize);
/// # impl abyss_middleware::Datagram for Req {
/// #     fn peer(&self) -> std::net::SocketAddr { ([192, 0, 2, 1], 1).into() }
/// #     fn local(&self) -> std::net::SocketAddr { ([192, 0, 2, 2], 2).into() }
/// #     fn payload_len(&self) -> usize { self.0 }
/// # }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// // Answers 100 bytes, whatever the request.
/// let mut service = AmplificationGuardLayer::new(3)
///     .layer(tower::service_fn(|_: Req| async { Ok::<_, std::convert::Infallible>(vec![0u8; 100]) }));
///
/// let small = service.ready().await.unwrap().call(Req(10)).await;
/// assert_eq!(drop_reason(&*small.unwrap_err()), Some(DropReason::Amplification));
///
/// let large = service.ready().await.unwrap().call(Req(40)).await;
/// assert_eq!(large.unwrap().len(), 100, "100 is at most 3 x 40");
/// # }
/// ```
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

impl<S> AmplificationGuard<S> {
    /// The wrapped service.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::AmplificationGuardLayer;
    /// use tower::Layer;
    ///
    /// let service = AmplificationGuardLayer::default().layer(String::from("inner"));
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
    /// use abyss_middleware::AmplificationGuardLayer;
    /// use tower::Layer;
    ///
    /// let mut service = AmplificationGuardLayer::default().layer(vec![1]);
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
    /// use abyss_middleware::AmplificationGuardLayer;
    /// use tower::Layer;
    ///
    /// let service = AmplificationGuardLayer::default().layer(String::from("inner"));
    /// assert_eq!(service.into_inner(), "inner");
    /// ```
    pub fn into_inner(self) -> S {
        self.inner
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
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: R) -> Self::Future {
        let peer = request.peer();
        let validated = self.validate.as_ref().is_some_and(|v| v.is_validated(peer));
        let limit = (!validated).then(|| request.payload_len().saturating_mul(self.factor));
        ResponseFuture::new(self.inner.call(request), ReplyRule::Limit(limit), peer)
    }
}

/// Response future of [`AmplificationGuard`]: the inner service's
/// response, or [`DropReason::Amplification`](crate::DropReason::Amplification)'s error when it is too
/// large for an unvalidated peer.
pub use crate::future::ReplyFuture as ResponseFuture;
