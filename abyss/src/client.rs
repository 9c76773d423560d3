//! A small UDP client, for tests, examples and tools: the original's
//! `Abyss.Transport.UDP.send_recv`, and a socket that keeps talking to one
//! server.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use abyss::{Request, Server};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let echo = abyss::service_fn(|r: Request| async move {
//!     Ok::<_, std::convert::Infallible>(r.into_payload())
//! });
//! let handle = Server::bind("127.0.0.1:0").serve(echo).await?;
//!
//! let reply = abyss::client::send_recv(handle.local_addr(), b"ping", Duration::from_secs(5)).await?;
//! assert_eq!(reply, "ping");
//! # handle.shutdown().await;
//! # Ok(())
//! # }
//! ```

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::net::UdpSocket;

/// The largest UDP payload a reply can have.
const MAX_REPLY: usize = 65_535;

/// Sends `payload` to `server` from a fresh ephemeral port and returns the
/// first reply, or an [`io::ErrorKind::TimedOut`] error after `timeout`.
///
/// # Example
///
/// A server that does not answer (see the [module](self) for one that
/// does):
///
/// ```
/// use std::time::Duration;
///
/// # #[tokio::main]
/// # async fn main() -> std::io::Result<()> {
/// let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
/// let error = abyss::client::send_recv(silent.local_addr()?, b"ping", Duration::from_millis(50))
///     .await
///     .unwrap_err();
/// assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
/// # Ok(())
/// # }
/// ```
pub async fn send_recv(server: SocketAddr, payload: &[u8], timeout: Duration) -> io::Result<Bytes> {
    UdpClient::connect(server)
        .await?
        .request(payload, timeout)
        .await
}

/// A UDP socket on an ephemeral port, connected to one server: it sends
/// only there and receives only from there.
///
/// # Example
///
/// Requests from one port, so the server sees one peer:
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
/// let first = client.request(b"?", Duration::from_secs(5)).await?;
/// let second = client.request(b"?", Duration::from_secs(5)).await?;
/// assert_eq!(first, second);
/// handle.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct UdpClient {
    socket: UdpSocket,
}

impl UdpClient {
    /// Binds an ephemeral port on the unspecified address of `server`'s
    /// family and connects it to `server`.
    ///
    /// # Example
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use std::time::Duration;
    /// use abyss::client::UdpClient;
    /// use abyss::{Request, Server, service_fn};
    ///
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let echo = service_fn(|r: Request| async move { Ok::<_, Infallible>(r.into_payload()) });
    /// let handle = Server::bind("127.0.0.1:0").serve(echo).await?;
    ///
    /// let client = UdpClient::connect(handle.local_addr()).await?;
    /// // Connected: the system picked the interface that reaches the server.
    /// assert!(client.local_addr()?.ip().is_loopback());
    /// assert_eq!(client.request(b"hi", Duration::from_secs(5)).await?, "hi");
    /// handle.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect(server: SocketAddr) -> io::Result<Self> {
        let local: SocketAddr = match server {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        Self::connect_from(local, server).await
    }

    /// Binds `local` (port 0 for any) and connects it to `server`.
    ///
    /// # Example
    ///
    /// From an address of your choice, such as the one a server's
    /// allow-list expects:
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use std::time::Duration;
    /// use abyss::client::UdpClient;
    /// use abyss::{Request, Server, service_fn};
    ///
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let echo = service_fn(|r: Request| async move { Ok::<_, Infallible>(r.into_payload()) });
    /// let handle = Server::bind("127.0.0.1:0").serve(echo).await?;
    ///
    /// let local = "127.0.0.1:0".parse()?;
    /// let client = UdpClient::connect_from(local, handle.local_addr()).await?;
    /// assert_eq!(client.local_addr()?.ip(), local.ip());
    /// assert_eq!(client.request(b"hi", Duration::from_secs(5)).await?, "hi");
    /// handle.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect_from(local: SocketAddr, server: SocketAddr) -> io::Result<Self> {
        let socket = UdpSocket::bind(local).await?;
        socket.connect(server).await?;
        Ok(Self { socket })
    }

    /// The client's own address: the peer address the server sees.
    ///
    /// # Example
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
    /// let seen = client.request(b"?", Duration::from_secs(5)).await?;
    /// assert_eq!(seen, client.local_addr()?.to_string());
    /// handle.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Sends one datagram, without waiting for anything back.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss::client::UdpClient;
    ///
    /// # #[tokio::main]
    /// # async fn main() -> std::io::Result<()> {
    /// let collector = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    /// let client = UdpClient::connect(collector.local_addr()?).await?;
    /// client.send(b"cpu:42|g").await?; // a StatsD gauge: no reply expected
    ///
    /// let mut buf = [0; 64];
    /// let (n, from) = collector.recv_from(&mut buf).await?;
    /// assert_eq!((&buf[..n], from), (&b"cpu:42|g"[..], client.local_addr()?));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn send(&self, payload: &[u8]) -> io::Result<()> {
        self.socket.send(payload).await.map(drop)
    }

    /// Receives one datagram, or fails with [`io::ErrorKind::TimedOut`]
    /// after `timeout`. A port-unreachable answer from the server's host is
    /// [`io::ErrorKind::ConnectionRefused`].
    ///
    /// # Example
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use std::time::Duration;
    /// use abyss::client::UdpClient;
    /// use abyss::{Request, Server, service_fn};
    ///
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let echo = service_fn(|r: Request| async move { Ok::<_, Infallible>(r.into_payload()) });
    /// let handle = Server::bind("127.0.0.1:0").serve(echo).await?;
    ///
    /// let client = UdpClient::connect(handle.local_addr()).await?;
    /// client.send(b"ping").await?;
    /// assert_eq!(client.recv(Duration::from_secs(5)).await?, "ping");
    ///
    /// // One reply per request: nothing more comes.
    /// let error = client.recv(Duration::from_millis(50)).await.unwrap_err();
    /// assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
    /// handle.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn recv(&self, timeout: Duration) -> io::Result<Bytes> {
        let mut buf = BytesMut::zeroed(MAX_REPLY);
        let len = tokio::time::timeout(timeout, self.socket.recv(&mut buf))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no reply within {timeout:?}"),
                )
            })??;
        buf.truncate(len);
        Ok(buf.freeze())
    }

    /// Sends `payload` and waits for the reply, or fails as
    /// [`recv`](UdpClient::recv) does. UDP may lose either datagram: retry
    /// what matters.
    ///
    /// # Example
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use std::time::Duration;
    /// use abyss::client::UdpClient;
    /// use abyss::{Request, Server, service_fn};
    ///
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let echo = service_fn(|r: Request| async move { Ok::<_, Infallible>(r.into_payload()) });
    /// let handle = Server::bind("127.0.0.1:0").serve(echo).await?;
    ///
    /// let client = UdpClient::connect(handle.local_addr()).await?;
    /// for word in ["one", "two", "three"] {
    ///     assert_eq!(client.request(word.as_bytes(), Duration::from_secs(5)).await?, word);
    /// }
    /// handle.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn request(&self, payload: &[u8], timeout: Duration) -> io::Result<Bytes> {
        self.send(payload).await?;
        self.recv(timeout).await
    }
}
