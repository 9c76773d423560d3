//! Allow and deny lists of address blocks.
//!
//! [`IpFilterLayer`] holds the lists and is built like tower-http's
//! `CorsLayer`: `IpFilterLayer::new().allow(block).deny(block)`. The
//! service it makes, [`IpFilter`], drops the datagrams of refused peers
//! before the service sees them: they fail with the zero-sized error of
//! [`DropReason::Denied`], are counted by the
//! server as `denied` and traced as `peer_denied` (target
//! `abyss::listener`, with the peer).
//!
//! The deny list always wins; an allow list that is not empty admits only
//! its blocks. IPv4 peers seen through a dual-stack socket
//! (`::ffff:a.b.c.d`) are matched as IPv4.
//!
//! # Example
//!
//! ```
//! use abyss_middleware::filter::IpFilterLayer;
//! use tower::ServiceBuilder;
//! # #[derive(Debug)] struct Req;
//! # impl abyss_middleware::Datagram for Req {
//! #     fn peer(&self) -> std::net::SocketAddr { ([192, 0, 2, 1], 1).into() }
//! #     fn local(&self) -> std::net::SocketAddr { ([192, 0, 2, 2], 2).into() }
//! #     fn payload_len(&self) -> usize { 0 }
//! # }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let service = ServiceBuilder::new()
//!     .layer(
//!         IpFilterLayer::new()
//!             .allow("10.0.0.0/8".parse()?)
//!             .deny("10.66.0.0/16".parse()?),
//!     )
//!     .service_fn(|_: Req| async { Ok::<_, std::convert::Infallible>(()) });
//! assert!(service.admits("10.1.2.3:53".parse()?));
//! assert!(!service.admits("10.66.0.1:53".parse()?));
//! # Ok(())
//! # }
//! ```

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::task::{Context, Poll};

use ipnet::IpNet;
use tower::{BoxError, Layer, Service};

pub use crate::future::ResponseFuture;
use crate::targets::LISTENER;
use crate::{Datagram, DropReason};

/// The allow and deny lists.
#[derive(Debug, Clone, Default)]
struct Rules {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
}

impl Rules {
    fn admits(&self, peer: SocketAddr) -> bool {
        let ip = match peer.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        if self.deny.iter().any(|block| block.contains(&ip)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|block| block.contains(&ip))
    }
}

/// Applies [`IpFilter`]: which peers may be served, as a deny list that
/// always wins and an allow list that, when not empty, admits only its
/// blocks; see the [module docs](self).
///
/// Cheap to clone: the lists are shared.
///
/// # Example
///
/// ```
/// use abyss_middleware::IpFilterLayer;
///
/// let filter = IpFilterLayer::new()
///     .allow("192.0.2.0/24".parse().unwrap())
///     .deny("192.0.2.66/32".parse().unwrap());
/// assert!(filter.admits("192.0.2.7:53".parse().unwrap()));
/// assert!(!filter.admits("192.0.2.66:53".parse().unwrap()));
/// assert!(!filter.admits("198.51.100.1:53".parse().unwrap()));
/// ```
#[derive(Debug, Clone, Default)]
pub struct IpFilterLayer {
    rules: Arc<Rules>,
}

impl IpFilterLayer {
    /// A filter that admits everyone.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::IpFilterLayer;
    ///
    /// assert!(IpFilterLayer::new().admits("198.51.100.1:53".parse().unwrap()));
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Admits `block` (and, once any block is allowed, only allowed blocks).
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::IpFilterLayer;
    ///
    /// let lan = IpFilterLayer::new()
    ///     .allow("192.168.0.0/16".parse().unwrap())
    ///     .allow("fd00::/8".parse().unwrap());
    /// assert!(lan.admits("192.168.1.20:53".parse().unwrap()));
    /// assert!(lan.admits("[fd00::1]:53".parse().unwrap()));
    /// assert!(!lan.admits("203.0.113.9:53".parse().unwrap()));
    /// ```
    #[must_use]
    pub fn allow(mut self, block: IpNet) -> Self {
        Arc::make_mut(&mut self.rules).allow.push(block);
        self
    }

    /// Refuses `block`, whatever the allow list says.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::IpFilterLayer;
    ///
    /// let filter = IpFilterLayer::new().deny("203.0.113.0/24".parse().unwrap());
    /// assert!(!filter.admits("203.0.113.9:53".parse().unwrap()));
    /// assert!(filter.admits("198.51.100.1:53".parse().unwrap()), "no allow list: the rest pass");
    /// ```
    #[must_use]
    pub fn deny(mut self, block: IpNet) -> Self {
        Arc::make_mut(&mut self.rules).deny.push(block);
        self
    }

    /// Whether `peer` may be served.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::IpFilterLayer;
    ///
    /// let filter = IpFilterLayer::new().allow("192.0.2.0/24".parse().unwrap());
    /// // An IPv4 peer on a dual-stack socket is matched as IPv4.
    /// assert!(filter.admits("[::ffff:192.0.2.1]:53".parse().unwrap()));
    /// ```
    pub fn admits(&self, peer: SocketAddr) -> bool {
        self.rules.admits(peer)
    }
}

impl<S> Layer<S> for IpFilterLayer {
    type Service = IpFilter<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IpFilter {
            inner,
            rules: self.rules.clone(),
        }
    }
}

/// Drops the datagrams of peers its [`IpFilterLayer`] refuses; see the
/// [module docs](self).
///
/// # Example
///
/// ```
/// use abyss_middleware::{DropReason, IpFilterLayer, drop_reason};
/// use tower::{Layer, Service, ServiceExt};
/// # #[derive(Debug)] struct Req(std::net::SocketAddr);
/// # impl abyss_middleware::Datagram for Req {
/// #     fn peer(&self) -> std::net::SocketAddr { self.0 }
/// #     fn local(&self) -> std::net::SocketAddr { ([192, 0, 2, 2], 2).into() }
/// #     fn payload_len(&self) -> usize { 0 }
/// # }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let mut service = IpFilterLayer::new()
///     .deny("203.0.113.0/24".parse().unwrap())
///     .layer(tower::service_fn(|_: Req| async { Ok::<_, std::convert::Infallible>("hello") }));
///
/// let admitted = service.ready().await.unwrap().call(Req("198.51.100.1:5000".parse().unwrap())).await;
/// assert_eq!(admitted.unwrap(), "hello");
///
/// let denied = service.ready().await.unwrap().call(Req("203.0.113.9:5000".parse().unwrap())).await;
/// assert_eq!(drop_reason(&*denied.unwrap_err()), Some(DropReason::Denied));
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct IpFilter<S> {
    inner: S,
    rules: Arc<Rules>,
}

impl<S> IpFilter<S> {
    /// Whether `peer` may be served.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::IpFilterLayer;
    /// use tower::Layer;
    ///
    /// let service = IpFilterLayer::new()
    ///     .allow("192.0.2.0/24".parse().unwrap())
    ///     .layer(tower::service_fn(|_: ()| async { Ok::<_, std::convert::Infallible>(()) }));
    /// assert!(service.admits("192.0.2.1:53".parse().unwrap()));
    /// assert!(!service.admits("198.51.100.1:53".parse().unwrap()));
    /// ```
    pub fn admits(&self, peer: SocketAddr) -> bool {
        self.rules.admits(peer)
    }

    /// The wrapped service.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::IpFilterLayer;
    /// use tower::Layer;
    ///
    /// let service = IpFilterLayer::new().layer(String::from("inner"));
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
    /// use abyss_middleware::IpFilterLayer;
    /// use tower::Layer;
    ///
    /// let mut service = IpFilterLayer::new().layer(vec![1]);
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
    /// use abyss_middleware::IpFilterLayer;
    /// use tower::Layer;
    ///
    /// let service = IpFilterLayer::new().layer(String::from("inner"));
    /// assert_eq!(service.into_inner(), "inner");
    /// ```
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, R> Service<R> for IpFilter<S>
where
    S: Service<R>,
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
        if !self.rules.admits(peer) {
            tracing::debug!(target: LISTENER, peer = %peer, "peer_denied");
            return ResponseFuture::rejected(DropReason::Denied);
        }
        ResponseFuture::inner(self.inner.call(request))
    }
}
