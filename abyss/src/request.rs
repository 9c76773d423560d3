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
    local: SocketAddr,
    payload: Bytes,
    received_at: Instant,
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
            local,
            payload,
            received_at: Instant::now(),
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
            local,
            payload,
            received_at,
            extensions: Extensions::new(),
            sender,
        }
    }

    /// The address the datagram came from; the reply goes here.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The address the datagram was sent to. On Linux, for a server bound to
    /// `0.0.0.0` or `::`, this is the real destination (which may be a
    /// broadcast or multicast address); elsewhere it is the bound address.
    pub fn local(&self) -> SocketAddr {
        self.local
    }

    /// The datagram's bytes.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// Takes the datagram's bytes.
    pub fn into_payload(self) -> Bytes {
        self.payload
    }

    /// When the listener took the datagram from the socket (one reading per
    /// receive batch, from tokio's clock).
    pub fn received_at(&self) -> Instant {
        self.received_at
    }

    /// Typed values that layers attach for the layers and service after them.
    pub fn extensions(&self) -> &Extensions {
        &self.extensions
    }

    /// Mutable access to the extensions.
    pub fn extensions_mut(&mut self) -> &mut Extensions {
        &mut self.extensions
    }

    /// A handle to send datagrams from the socket this one arrived on, to
    /// any address (an upstream, a broadcast address, several peers).
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
    pub fn detached() -> Self {
        let transport: Weak<dyn Transport> = Weak::<Closed>::new();
        Self { transport }
    }

    /// Sends `payload` to `destination`, waiting while the socket's send
    /// buffer is full.
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

    /// The address of the socket this handle sends from.
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
