//! Allow and deny lists of address blocks.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::task::{Context, Poll};

use ipnet::IpNet;
use tower::{BoxError, Layer, Service};

use crate::future::ResponseFuture;
use crate::targets::LISTENER;
use crate::{Datagram, DropReason};

/// Which peers may be served: a deny list that always wins, and an allow
/// list that, when not empty, admits only its blocks. IPv4 peers seen
/// through a dual-stack socket (`::ffff:a.b.c.d`) are matched as IPv4.
///
/// # Example
///
/// ```
/// use abyss_middleware::IpFilter;
///
/// let filter = IpFilter::new()
///     .allow("192.0.2.0/24".parse().unwrap())
///     .deny("192.0.2.66/32".parse().unwrap());
/// assert!(filter.admits("192.0.2.7:53".parse().unwrap()));
/// assert!(!filter.admits("192.0.2.66:53".parse().unwrap()));
/// assert!(!filter.admits("198.51.100.1:53".parse().unwrap()));
/// ```
#[derive(Debug, Clone, Default)]
pub struct IpFilter {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
}

impl IpFilter {
    /// A filter that admits everyone.
    pub fn new() -> Self {
        Self::default()
    }

    /// Admits `block` (and, once any block is allowed, only allowed blocks).
    #[must_use]
    pub fn allow(mut self, block: IpNet) -> Self {
        self.allow.push(block);
        self
    }

    /// Refuses `block`, whatever the allow list says.
    #[must_use]
    pub fn deny(mut self, block: IpNet) -> Self {
        self.deny.push(block);
        self
    }

    /// Whether `peer` may be served.
    pub fn admits(&self, peer: SocketAddr) -> bool {
        let ip = match peer.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        if self.deny.iter().any(|block| block.contains(&ip)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|block| block.contains(&ip))
    }

    /// The layer applying this filter.
    pub fn layer(self) -> IpFilterLayer {
        IpFilterLayer {
            filter: Arc::new(self),
        }
    }
}

/// Applies an [`IpFilter`]: refused peers' datagrams are dropped before the
/// service, counted as `denied` and traced as `peer_denied`.
#[derive(Debug, Clone)]
pub struct IpFilterLayer {
    filter: Arc<IpFilter>,
}

impl<S> Layer<S> for IpFilterLayer {
    type Service = IpFiltered<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IpFiltered {
            inner,
            filter: self.filter.clone(),
        }
    }
}

/// A service behind an [`IpFilter`]; see [`IpFilterLayer`].
#[derive(Debug, Clone)]
pub struct IpFiltered<S> {
    inner: S,
    filter: Arc<IpFilter>,
}

impl<S, R> Service<R> for IpFiltered<S>
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
        if !self.filter.admits(peer) {
            tracing::debug!(target: LISTENER, peer = %peer, "peer_denied");
            return ResponseFuture::rejected(DropReason::Denied);
        }
        ResponseFuture::inner(self.inner.call(request))
    }
}
