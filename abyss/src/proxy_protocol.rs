//! PROXY protocol version 2 over UDP: behind a load balancer or proxy
//! (dnsdist, HAProxy, Envoy), each datagram starts with a header naming
//! the client it relays; the service should see that client.
//!
//! [`ProxyProtocolLayer`] strips the header of datagrams from the proxies
//! it trusts (a list of address blocks), makes [`Request::peer`] the client
//! the header names, and keeps the proxy's address in [`Request::proxy`];
//! the reply still goes to the proxy, which relays it (as PROXY over UDP
//! expects: replies carry no header). A datagram from a trusted proxy
//! without a valid version 2 header, and one *with* a header from anyone
//! else (a client trying to pass for another), is dropped: it fails with
//! [`DropReason::Denied`], counted
//! as `denied`, and traced as `proxy_header_refused` with the reason.
//!
//! A `LOCAL` header (a proxy's own health check) leaves the peer as it is;
//! a `PROXY` header for a stream protocol or an address family other than
//! IPv4 and IPv6 is refused. Type-length-value extensions are skipped.
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//! use abyss::proxy_protocol::ProxyProtocolLayer;
//! use abyss::{Request, Server, ServiceBuilder};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let service = ServiceBuilder::new()
//!     // dnsdist on 10.0.0.2 adds the header.
//!     .layer(ProxyProtocolLayer::new().trust("10.0.0.2/32".parse()?))
//!     .service_fn(|request: Request| async move {
//!         // The client dnsdist relayed for, not dnsdist.
//!         Ok::<_, Infallible>(request.peer().to_string())
//!     });
//! let handle = Server::bind("127.0.0.1:0").serve(service).await?;
//! # handle.shutdown().await;
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::future::{Ready, ready};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::Either;
use ipnet::IpNet;
use tower::{BoxError, Layer, Service};

use crate::Request;
use crate::middleware::DropReason;
use crate::middleware::targets::LISTENER;

/// The 12 bytes every version 2 header starts with.
const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// What a header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Header {
    /// The proxy's own datagram: the peer stays.
    Local { len: usize },
    /// Relayed for `client`.
    Proxied { len: usize, client: SocketAddr },
}

/// Why a datagram's header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Missing,
    Malformed,
    Unsupported,
    Untrusted,
}

impl Refusal {
    fn as_str(self) -> &'static str {
        match self {
            Refusal::Missing => "no PROXY v2 header from a trusted proxy",
            Refusal::Malformed => "malformed PROXY v2 header",
            Refusal::Unsupported => {
                "PROXY v2 header for a protocol other than UDP over IPv4 or IPv6"
            }
            Refusal::Untrusted => "PROXY header from an untrusted source",
        }
    }
}

/// Parses the version 2 header at the start of `datagram`.
fn parse(datagram: &[u8]) -> Result<Header, Refusal> {
    if !datagram.starts_with(&SIGNATURE) {
        return Err(Refusal::Missing);
    }
    let fixed = datagram.get(12..16).ok_or(Refusal::Malformed)?;
    let (version, command) = (fixed[0] >> 4, fixed[0] & 0x0f);
    let (family, protocol) = (fixed[1] >> 4, fixed[1] & 0x0f);
    let len = 16 + usize::from(u16::from_be_bytes([fixed[2], fixed[3]]));
    if version != 2 || command > 1 {
        return Err(Refusal::Malformed);
    }
    let block = datagram.get(16..len).ok_or(Refusal::Malformed)?;
    if command == 0 {
        return Ok(Header::Local { len });
    }
    // DGRAM only: a stream header has no business on a UDP socket.
    if protocol != 2 {
        return Err(Refusal::Unsupported);
    }
    let client = match family {
        1 => {
            let a = block.get(..12).ok_or(Refusal::Malformed)?;
            let ip = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            SocketAddr::new(IpAddr::V4(ip), u16::from_be_bytes([a[8], a[9]]))
        }
        2 => {
            let a = block.get(..36).ok_or(Refusal::Malformed)?;
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&a[..16]);
            let ip = Ipv6Addr::from(octets);
            SocketAddr::new(IpAddr::V6(ip), u16::from_be_bytes([a[32], a[33]]))
        }
        _ => return Err(Refusal::Unsupported),
    };
    Ok(Header::Proxied { len, client })
}

/// Strips PROXY v2 headers from trusted proxies; see the [module
/// docs](self).
///
/// # Example
///
/// ```
/// use abyss::proxy_protocol::ProxyProtocolLayer;
///
/// let layer = ProxyProtocolLayer::new()
///     .trust("10.0.0.0/24".parse().unwrap())
///     .trust("fd00::/64".parse().unwrap());
/// assert!(layer.trusts("10.0.0.7:40000".parse().unwrap()));
/// assert!(!layer.trusts("192.0.2.1:40000".parse().unwrap()));
/// ```
#[derive(Clone, Default)]
pub struct ProxyProtocolLayer {
    trusted: Arc<Vec<IpNet>>,
}

impl fmt::Debug for ProxyProtocolLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyProtocolLayer")
            .field("trusted", &self.trusted)
            .finish()
    }
}

impl ProxyProtocolLayer {
    /// A layer that trusts no proxy yet: every header is refused.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss::proxy_protocol::ProxyProtocolLayer;
    ///
    /// assert!(!ProxyProtocolLayer::new().trusts("127.0.0.1:1".parse().unwrap()));
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Trusts the proxies in `block`: their datagrams must carry a header,
    /// whose client becomes the peer.
    ///
    /// # Example
    ///
    /// See [`ProxyProtocolLayer`].
    #[must_use]
    pub fn trust(mut self, block: IpNet) -> Self {
        Arc::make_mut(&mut self.trusted).push(block);
        self
    }

    /// Whether datagrams from `source` are taken to carry a header.
    /// IPv4 sources seen through a dual-stack socket match as IPv4.
    ///
    /// # Example
    ///
    /// See [`ProxyProtocolLayer`].
    pub fn trusts(&self, source: SocketAddr) -> bool {
        let ip = source.ip().to_canonical();
        self.trusted.iter().any(|block| block.contains(&ip))
    }
}

impl<S> Layer<S> for ProxyProtocolLayer {
    type Service = ProxyProtocol<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ProxyProtocol {
            inner,
            layer: self.clone(),
        }
    }
}

/// A service behind [`ProxyProtocolLayer`].
///
/// # Example
///
/// ```
/// use abyss::proxy_protocol::{ProxyProtocol, ProxyProtocolLayer};
/// use abyss::{Layer, Request};
///
/// let inner = abyss::service_fn(|_: Request| async { Ok::<_, std::convert::Infallible>(()) });
/// let service: ProxyProtocol<_> = ProxyProtocolLayer::new().layer(inner);
/// # let _ = service;
/// ```
#[derive(Clone)]
pub struct ProxyProtocol<S> {
    inner: S,
    layer: ProxyProtocolLayer,
}

impl<S> fmt::Debug for ProxyProtocol<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyProtocol")
            .field("layer", &self.layer)
            .finish_non_exhaustive()
    }
}

impl<S> Service<Request> for ProxyProtocol<S>
where
    S: Service<Request>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Either<
        futures_util::future::MapErr<S::Future, fn(S::Error) -> BoxError>,
        Ready<Result<S::Response, BoxError>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        use futures_util::TryFutureExt;
        let source = request.peer();
        let outcome = if self.layer.trusts(source) {
            parse(request.payload()).map(Some)
        } else if request.payload().starts_with(&SIGNATURE) {
            Err(Refusal::Untrusted)
        } else {
            Ok(None)
        };
        match outcome {
            Ok(header) => {
                match header {
                    Some(Header::Proxied { len, client }) => {
                        let payload = request.payload().slice(len..);
                        request.relayed(client, payload);
                    }
                    Some(Header::Local { len }) => {
                        let payload = request.payload().slice(len..);
                        request.relayed(source, payload);
                    }
                    None => {}
                }
                let into: fn(S::Error) -> BoxError = Into::into;
                Either::Left(self.inner.call(request).map_err(into))
            }
            Err(refusal) => {
                tracing::debug!(target: LISTENER, peer = %source, reason = refusal.as_str(), "proxy_header_refused");
                Either::Right(ready(Err(DropReason::Denied.into_error())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4_header(client: SocketAddr, tlv: &[u8]) -> Vec<u8> {
        let SocketAddr::V4(client) = client else {
            unreachable!()
        };
        let mut header = SIGNATURE.to_vec();
        header.extend_from_slice(&[0x21, 0x12]);
        header.extend_from_slice(&(12 + tlv.len() as u16).to_be_bytes());
        header.extend_from_slice(&client.ip().octets());
        header.extend_from_slice(&[192, 0, 2, 53]);
        header.extend_from_slice(&client.port().to_be_bytes());
        header.extend_from_slice(&53u16.to_be_bytes());
        header.extend_from_slice(tlv);
        header
    }

    #[test]
    fn a_v4_header_names_the_client_and_its_length_covers_the_extensions() {
        let client: SocketAddr = "198.51.100.7:40000".parse().unwrap();
        let header = v4_header(client, &[0x04, 0, 1, 0xaa]);
        assert_eq!(
            parse(&header),
            Ok(Header::Proxied {
                len: header.len(),
                client
            })
        );
    }

    #[test]
    fn a_v6_header_names_the_client() {
        let mut header = SIGNATURE.to_vec();
        header.extend_from_slice(&[0x21, 0x22, 0, 36]);
        let client: Ipv6Addr = "2001:db8::7".parse().unwrap();
        header.extend_from_slice(&client.octets());
        header.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        header.extend_from_slice(&[0x9c, 0x40, 0, 53]);
        let expected = SocketAddr::new(IpAddr::V6(client), 40000);
        assert_eq!(
            parse(&header),
            Ok(Header::Proxied {
                len: 52,
                client: expected
            })
        );
    }

    #[test]
    fn local_stream_short_and_foreign_headers_are_told_apart() {
        let mut local = SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(parse(&local), Ok(Header::Local { len: 16 }));
        let client: SocketAddr = "198.51.100.7:40000".parse().unwrap();
        let mut stream = v4_header(client, &[]);
        stream[13] = 0x11;
        assert_eq!(parse(&stream), Err(Refusal::Unsupported));
        let whole = v4_header(client, &[]);
        for cut in 0..whole.len() {
            assert!(parse(&whole[..cut]).is_err(), "cut at {cut}");
        }
        assert_eq!(parse(b"\x12\x34 a DNS query"), Err(Refusal::Missing));
        let mut v1 = whole.clone();
        v1[12] = 0x11;
        assert_eq!(parse(&v1), Err(Refusal::Malformed));
    }
}
