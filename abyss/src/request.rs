use std::fmt;
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Instant;

use bytes::Bytes;
use http::Extensions;

use crate::transport::{Transmit, Transport};

/// One received datagram, as handed to the user's service.
///
/// Fields are private with accessors, so new metadata can be added without
/// breaking anyone. [`Request::into_payload`] takes the bytes without a copy.
///
/// # Example
///
/// ```
/// use abyss::{Bytes, Request};
///
/// async fn handle(request: Request) -> Result<Option<Bytes>, std::convert::Infallible> {
///     println!("{} bytes from {} to {}", request.payload().len(), request.peer(), request.local());
///     Ok(Some(request.into_payload()))
/// }
/// ```
pub struct Request {
    peer: SocketAddr,
    /// The proxy the datagram came through, when a PROXY header named the
    /// client (`peer`).
    proxy: Option<SocketAddr>,
    local: SocketAddr,
    payload: Bytes,
    received_at: Instant,
    arrival: Arrival,
    extensions: Extensions,
    sender: SendHandle,
}

impl Request {
    /// A request as the server builds it; public so that services can be
    /// tested without a socket.
    ///
    /// ```
    /// use abyss::{Request, SendHandle};
    ///
    /// let request = Request::new(
    ///     "192.0.2.7:5000".parse().unwrap(),
    ///     "192.0.2.1:53".parse().unwrap(),
    ///     abyss::Bytes::from_static(b"hello"),
    ///     SendHandle::detached(),
    /// );
    /// assert_eq!(request.payload(), &b"hello"[..]);
    /// ```
    pub fn new(peer: SocketAddr, local: SocketAddr, payload: Bytes, sender: SendHandle) -> Self {
        Self {
            peer,
            proxy: None,
            local,
            payload,
            received_at: Instant::now(),
            arrival: Arrival::default(),
            extensions: Extensions::new(),
            sender,
        }
    }

    pub(crate) fn received(
        peer: SocketAddr,
        local: SocketAddr,
        payload: Bytes,
        received_at: Instant,
        sender: SendHandle,
    ) -> Self {
        Self {
            peer,
            proxy: None,
            local,
            payload,
            received_at,
            arrival: Arrival::default(),
            extensions: Extensions::new(),
            sender,
        }
    }

    /// The address the datagram came from, or the client a trusted proxy
    /// named for it ([`proxy`](Self::proxy)). The reply goes to where the
    /// datagram came from.
    ///
    /// # Example
    ///
    /// A service that tells each peer its address as the server sees it:
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use std::time::Duration;
    /// use abyss::client::UdpClient;
    /// use abyss::{Request, Server, service_fn};
    ///
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let whoami = service_fn(|r: Request| async move { Ok::<_, Infallible>(r.peer().to_string()) });
    /// let handle = Server::bind("127.0.0.1:0").serve(whoami).await?;
    ///
    /// let client = UdpClient::connect(handle.local_addr()).await?;
    /// let reply = client.request(b"?", Duration::from_secs(5)).await?;
    /// assert_eq!(reply, client.local_addr()?.to_string());
    /// handle.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The proxy or load balancer the datagram came through, when a PROXY
    /// protocol header from it named the client (then [`peer`](Self::peer)
    /// is that client; see [`proxy_protocol`](crate::proxy_protocol)). The
    /// reply goes to the proxy, which relays it.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss::{Request, SendHandle};
    ///
    /// let direct = Request::new(
    ///     "192.0.2.7:5000".parse().unwrap(),
    ///     "192.0.2.1:53".parse().unwrap(),
    ///     abyss::Bytes::from_static(b"hello"),
    ///     SendHandle::detached(),
    /// );
    /// assert_eq!(direct.proxy(), None);
    /// ```
    pub fn proxy(&self) -> Option<SocketAddr> {
        self.proxy
    }

    /// What the kernel said of the datagram's arrival.
    pub(crate) fn with_arrival(mut self, arrival: Arrival) -> Self {
        self.arrival = arrival;
        self
    }

    /// The index of the network interface the datagram arrived on, where
    /// the transport can tell (Linux; `if_indextoname` gives its name).
    /// `None` from [`Request::new`].
    ///
    /// # Example
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use abyss::{Request, Server, service_fn};
    ///
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let where_from = service_fn(|r: Request| async move {
    ///     Ok::<_, Infallible>(format!("{:?}", r.interface()))
    /// });
    /// let handle = Server::bind("127.0.0.1:0").serve(where_from).await?;
    /// let reply = abyss::client::send_recv(handle.local_addr(), b"?", std::time::Duration::from_secs(5)).await?;
    /// # #[cfg(target_os = "linux")]
    /// assert_eq!(reply, "Some(1)", "loopback is interface 1 on Linux");
    /// # handle.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn interface(&self) -> Option<u32> {
        self.arrival.interface
    }

    /// The datagram's TOS (IPv4) or traffic class (IPv6) byte, DSCP and
    /// ECN, when the server's UDP options ask for it
    /// ([`UdpOptions::receive_tos`](crate::UdpOptions::receive_tos)).
    ///
    /// # Example
    ///
    /// ```
    /// use abyss::{Request, SendHandle};
    ///
    /// let request = Request::new(
    ///     "192.0.2.7:5000".parse().unwrap(),
    ///     "192.0.2.1:53".parse().unwrap(),
    ///     abyss::Bytes::from_static(b"hello"),
    ///     SendHandle::detached(),
    /// );
    /// assert_eq!(request.tos(), None);
    /// ```
    pub fn tos(&self) -> Option<u8> {
        self.arrival.tos
    }

    /// When the kernel received the datagram, when the server's UDP options
    /// ask for it ([`UdpOptions::receive_timestamps`](crate::UdpOptions::receive_timestamps)):
    /// before it waited in the socket's queue, unlike
    /// [`received_at`](Self::received_at).
    ///
    /// # Example
    ///
    /// ```
    /// use abyss::{Request, SendHandle};
    ///
    /// let request = Request::new(
    ///     "192.0.2.7:5000".parse().unwrap(),
    ///     "192.0.2.1:53".parse().unwrap(),
    ///     abyss::Bytes::from_static(b"hello"),
    ///     SendHandle::detached(),
    /// );
    /// assert_eq!(request.kernel_received_at(), None);
    /// ```
    pub fn kernel_received_at(&self) -> Option<std::time::SystemTime> {
        self.arrival.timestamp
    }

    /// Records that the datagram came through `self.peer` on behalf of
    /// `client`, and leaves `payload` (what followed the proxy's header).
    pub(crate) fn relayed(&mut self, client: SocketAddr, payload: Bytes) {
        self.proxy = Some(self.peer);
        self.peer = client;
        self.payload = payload;
    }

    /// The address the datagram was sent to. On Linux, for a server bound to
    /// `0.0.0.0` or `::`, this is the real destination (which may be a
    /// broadcast or multicast address); elsewhere it is the bound address.
    ///
    /// # Example
    ///
    /// One server on every address, answering by the one it was asked on:
    ///
    /// ```
    /// use abyss::{Request, SendHandle};
    ///
    /// fn zone(request: &Request) -> &'static str {
    ///     if request.local().ip().is_loopback() { "internal" } else { "public" }
    /// }
    ///
    /// let request = Request::new(
    ///     "127.0.0.1:5000".parse().unwrap(),
    ///     "127.0.0.1:53".parse().unwrap(),
    ///     abyss::Bytes::new(),
    ///     SendHandle::detached(),
    /// );
    /// assert_eq!(zone(&request), "internal");
    /// ```
    pub fn local(&self) -> SocketAddr {
        self.local
    }

    /// The datagram's bytes.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss::{Bytes, Request, SendHandle};
    ///
    /// async fn ping(request: Request) -> Result<Option<&'static str>, std::convert::Infallible> {
    ///     Ok(request.payload().starts_with(b"PING").then_some("PONG"))
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let peer = "192.0.2.7:5000".parse().unwrap();
    /// let local = "192.0.2.1:7".parse().unwrap();
    /// let request = Request::new(peer, local, Bytes::from_static(b"PING 1"), SendHandle::detached());
    /// assert_eq!(request.payload().len(), 6);
    /// assert_eq!(ping(request).await.unwrap(), Some("PONG"));
    /// # }
    /// ```
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// Takes the datagram's bytes, without a copy.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss::{Bytes, Request, SendHandle};
    ///
    /// let payload = Bytes::from(vec![1, 2, 3]);
    /// let request = Request::new(
    ///     "192.0.2.7:5000".parse().unwrap(),
    ///     "192.0.2.1:7".parse().unwrap(),
    ///     payload.clone(),
    ///     SendHandle::detached(),
    /// );
    /// let taken = request.into_payload();
    /// assert_eq!(taken.as_ptr(), payload.as_ptr(), "the same bytes, not a copy");
    /// ```
    pub fn into_payload(self) -> Bytes {
        self.payload
    }

    /// When the listener took the datagram from the socket (one reading per
    /// receive batch, from tokio's clock).
    ///
    /// # Example
    ///
    /// Not answering what waited too long to be handled (the peer has
    /// given up on it):
    ///
    /// ```
    /// use std::time::Duration;
    /// use abyss::{Request, SendHandle};
    ///
    /// fn is_stale(request: &Request) -> bool {
    ///     request.received_at().elapsed() > Duration::from_secs(2)
    /// }
    ///
    /// let request = Request::new(
    ///     "192.0.2.7:5000".parse().unwrap(),
    ///     "192.0.2.1:53".parse().unwrap(),
    ///     abyss::Bytes::new(),
    ///     SendHandle::detached(),
    /// );
    /// assert!(!is_stale(&request)); // `Request::new` takes the time now
    /// ```
    pub fn received_at(&self) -> Instant {
        self.received_at
    }

    /// Typed values that layers attach for the layers and service after them.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss::{Request, SendHandle};
    ///
    /// #[derive(Clone, Debug, PartialEq)]
    /// struct Tenant(&'static str);
    ///
    /// let mut request = Request::new(
    ///     "192.0.2.7:5000".parse().unwrap(),
    ///     "192.0.2.1:53".parse().unwrap(),
    ///     abyss::Bytes::new(),
    ///     SendHandle::detached(),
    /// );
    /// assert_eq!(request.extensions().get::<Tenant>(), None);
    /// request.extensions_mut().insert(Tenant("acme"));
    /// assert_eq!(request.extensions().get::<Tenant>(), Some(&Tenant("acme")));
    /// ```
    pub fn extensions(&self) -> &Extensions {
        &self.extensions
    }

    /// Mutable access to the extensions.
    ///
    /// # Example
    ///
    /// A layer that tags each request for the service behind it:
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use std::time::Duration;
    /// use abyss::{Request, Server, ServiceBuilder};
    ///
    /// #[derive(Clone)]
    /// struct Tenant(&'static str);
    ///
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let service = ServiceBuilder::new()
    ///     .map_request(|mut r: Request| {
    ///         r.extensions_mut().insert(Tenant("acme"));
    ///         r
    ///     })
    ///     .service_fn(|r: Request| async move {
    ///         Ok::<_, Infallible>(r.extensions().get::<Tenant>().map(|t| t.0))
    ///     });
    /// let handle = Server::bind("127.0.0.1:0").serve(service).await?;
    ///
    /// let reply = abyss::client::send_recv(handle.local_addr(), b"who?", Duration::from_secs(5)).await?;
    /// assert_eq!(reply, "acme");
    /// handle.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn extensions_mut(&mut self) -> &mut Extensions {
        &mut self.extensions
    }

    /// A handle to send datagrams from the socket this one arrived on, to
    /// any address (an upstream, a broadcast address, several peers).
    ///
    /// # Example
    ///
    /// A service that copies each datagram to a monitor instead of
    /// replying:
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use abyss::{Request, Server, service_fn};
    ///
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let monitor = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    /// let to = monitor.local_addr()?;
    /// let mirror = service_fn(move |r: Request| async move {
    ///     r.sender().send_to(to, r.payload()).await?;
    ///     Ok::<_, std::io::Error>(None::<abyss::Bytes>)
    /// });
    /// let handle = Server::bind("127.0.0.1:0").serve(mirror).await?;
    ///
    /// abyss::client::UdpClient::connect(handle.local_addr()).await?.send(b"event").await?;
    /// let mut buf = [0; 16];
    /// let (n, from) = monitor.recv_from(&mut buf).await?;
    /// assert_eq!(&buf[..n], b"event");
    /// assert_eq!(from, handle.local_addr(), "sent from the server's own socket");
    /// handle.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn sender(&self) -> &SendHandle {
        &self.sender
    }
}

impl crate::middleware::Datagram for Request {
    fn peer(&self) -> SocketAddr {
        self.peer
    }

    fn local(&self) -> SocketAddr {
        self.local
    }

    fn payload_len(&self) -> usize {
        self.payload.len()
    }

    fn received_at(&self) -> Instant {
        self.received_at
    }
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The payload is not printed: it may hold secrets.
        f.debug_struct("Request")
            .field("peer", &self.peer)
            .field("local", &self.local)
            .field("len", &self.payload.len())
            .field("received_at", &self.received_at)
            .finish_non_exhaustive()
    }
}

/// Sends datagrams from a listener's socket.
///
/// Cheap to clone. It does not keep the socket open: once the server is shut
/// down or suspended (and the socket's in-flight requests have finished),
/// sending fails with [`io::ErrorKind::NotConnected`].
///
/// # Example
///
/// A DHCP-style service that answers by broadcast instead of by reply:
///
/// ```
/// use abyss::{Bytes, Request};
///
/// async fn offer(request: Request) -> std::io::Result<Option<Bytes>> {
///     let broadcast = "255.255.255.255:68".parse().unwrap();
///     request.sender().send_to(broadcast, b"offer").await?;
///     Ok(None) // nothing to send back to the peer itself
/// }
/// ```
#[derive(Clone)]
pub struct SendHandle {
    transport: Weak<dyn Transport>,
}

impl SendHandle {
    pub(crate) fn new(transport: &Arc<dyn Transport>) -> Self {
        Self {
            transport: Arc::downgrade(transport),
        }
    }

    /// A handle with no socket behind it, for building requests in tests;
    /// every send fails with [`io::ErrorKind::NotConnected`].
    ///
    /// # Example
    ///
    /// Testing a handler without a server:
    ///
    /// ```
    /// use abyss::{Bytes, Request, SendHandle};
    ///
    /// async fn notify(request: Request) -> std::io::Result<Option<Bytes>> {
    ///     let upstream = "192.0.2.9:514".parse().unwrap();
    ///     request.sender().send_to(upstream, request.payload()).await?;
    ///     Ok(Some(Bytes::from_static(b"ok")))
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let request = Request::new(
    ///     "192.0.2.7:5000".parse().unwrap(),
    ///     "192.0.2.1:514".parse().unwrap(),
    ///     Bytes::from_static(b"event"),
    ///     SendHandle::detached(),
    /// );
    /// let error = notify(request).await.unwrap_err();
    /// assert_eq!(error.kind(), std::io::ErrorKind::NotConnected);
    /// # }
    /// ```
    pub fn detached() -> Self {
        let transport: Weak<dyn Transport> = Weak::<Closed>::new();
        Self { transport }
    }

    /// Sends `payload` to `destination`, waiting while the socket's send
    /// buffer is full.
    ///
    /// # Example
    ///
    /// A handle kept after its request, to push to a subscriber later,
    /// until the server stops:
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use std::time::Duration;
    /// use abyss::client::UdpClient;
    /// use abyss::{Request, Server, service_fn};
    ///
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let (subscribed, mut subscriptions) = tokio::sync::mpsc::unbounded_channel();
    /// let subscribe = service_fn(move |r: Request| {
    ///     let _ = subscribed.send((r.peer(), r.sender().clone()));
    ///     async { Ok::<_, Infallible>(()) } // no reply
    /// });
    /// let handle = Server::bind("127.0.0.1:0").serve(subscribe).await?;
    /// let client = UdpClient::connect(handle.local_addr()).await?;
    /// client.send(b"subscribe").await?;
    ///
    /// let (peer, sender) = subscriptions.recv().await.unwrap();
    /// sender.send_to(peer, b"update").await?;
    /// assert_eq!(client.recv(Duration::from_secs(5)).await?, "update");
    ///
    /// handle.shutdown().await;
    /// let error = sender.send_to(peer, b"late").await.unwrap_err();
    /// assert_eq!(error.kind(), std::io::ErrorKind::NotConnected);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn send_to(&self, destination: SocketAddr, payload: &[u8]) -> io::Result<()> {
        let transport = self.transport.upgrade().ok_or_else(closed)?;
        let transmit = Transmit::new(destination, payload);
        let sent = poll_fn(|cx| transport.poll_send(cx, std::slice::from_ref(&transmit))).await?;
        if sent == 1 {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "datagram not sent",
            ))
        }
    }

    /// The address of the socket this handle sends from: the server's
    /// address, or an error once the socket is closed.
    ///
    /// # Example
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use std::time::Duration;
    /// use abyss::{Request, Server, service_fn};
    ///
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let whereami = service_fn(|r: Request| async move {
    ///     Ok::<_, Infallible>(r.sender().local_addr().ok().map(|addr| addr.to_string()))
    /// });
    /// let handle = Server::bind("127.0.0.1:0").serve(whereami).await?;
    ///
    /// let reply = abyss::client::send_recv(handle.local_addr(), b"?", Duration::from_secs(5)).await?;
    /// assert_eq!(reply, handle.local_addr().to_string());
    /// assert!(abyss::SendHandle::detached().local_addr().is_err());
    /// handle.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.transport.upgrade().ok_or_else(closed)?.local_addr()
    }
}

impl fmt::Debug for SendHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SendHandle")
            .field("open", &(self.transport.strong_count() > 0))
            .finish()
    }
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the socket is closed")
}

/// Stands in for a transport in [`SendHandle::detached`]; never constructed.
#[derive(Debug)]
struct Closed;

impl Transport for Closed {
    fn poll_recv(
        &self,
        _cx: &mut std::task::Context<'_>,
        _bufs: &mut [io::IoSliceMut<'_>],
        _meta: &mut [crate::transport::RecvMeta],
    ) -> std::task::Poll<io::Result<usize>> {
        std::task::Poll::Ready(Err(closed()))
    }

    fn poll_send(
        &self,
        _cx: &mut std::task::Context<'_>,
        _transmits: &[Transmit<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        std::task::Poll::Ready(Err(closed()))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Err(closed())
    }
}

/// What the kernel said of a datagram's arrival.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Arrival {
    pub(crate) interface: Option<u32>,
    pub(crate) tos: Option<u8>,
    pub(crate) timestamp: Option<std::time::SystemTime>,
}
