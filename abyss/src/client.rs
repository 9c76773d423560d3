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
//! let echo = tower::service_fn(|r: Request| async move {
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
pub async fn send_recv(server: SocketAddr, payload: &[u8], timeout: Duration) -> io::Result<Bytes> {
    UdpClient::connect(server)
        .await?
        .request(payload, timeout)
        .await
}

/// A UDP socket on an ephemeral port, connected to one server: it sends
/// only there and receives only from there.
#[derive(Debug)]
pub struct UdpClient {
    socket: UdpSocket,
}

impl UdpClient {
    /// Binds an ephemeral port on the unspecified address of `server`'s
    /// family and connects it to `server`.
    pub async fn connect(server: SocketAddr) -> io::Result<Self> {
        let local: SocketAddr = match server {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        Self::connect_from(local, server).await
    }

    /// Binds `local` (port 0 for any) and connects it to `server`.
    pub async fn connect_from(local: SocketAddr, server: SocketAddr) -> io::Result<Self> {
        let socket = UdpSocket::bind(local).await?;
        socket.connect(server).await?;
        Ok(Self { socket })
    }

    /// The client's own address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Sends one datagram.
    pub async fn send(&self, payload: &[u8]) -> io::Result<()> {
        self.socket.send(payload).await.map(drop)
    }

    /// Receives one datagram, or fails with [`io::ErrorKind::TimedOut`]
    /// after `timeout`. A port-unreachable answer from the server's host is
    /// [`io::ErrorKind::ConnectionRefused`].
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

    /// Sends `payload` and waits for the reply.
    pub async fn request(&self, payload: &[u8], timeout: Duration) -> io::Result<Bytes> {
        self.send(payload).await?;
        self.recv(timeout).await
    }
}
