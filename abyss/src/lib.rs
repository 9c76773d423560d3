#![doc = include_str!("docs/crate.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod client;
mod error;
pub mod proxy_protocol;
pub mod reload;
mod request;
mod server;
pub mod session;
mod signal;
pub mod upstream;

pub use abyss_middleware::{IntoReply, Reply};
pub use error::Error;
pub use request::{Request, SendHandle};
#[cfg(unix)]
pub use server::successor_ready;
pub use server::{
    Builder, DEFAULT_MAX_DATAGRAM_SIZE, DEFAULT_MAX_IN_FLIGHT, DEFAULT_MAX_PACKET_SIZE,
    DEFAULT_SHUTDOWN_TIMEOUT, Dispatch, DrainReport, Drops, Server, ServerHandle, ServerState,
    Stats,
};
pub use signal::shutdown_signal;

/// The transport layer: the [`Transport`](transport::Transport) trait, UDP
/// sockets and their options (re-export of `abyss-transport`).
///
/// # Example
///
/// The server opens its sockets itself; a tool can open one too:
///
/// ```
/// use abyss::transport::{Transport, UdpOptions, UdpTransport};
///
/// # #[tokio::main]
/// # async fn main() -> std::io::Result<()> {
/// let socket = UdpTransport::bind("127.0.0.1:0".parse().unwrap(), &UdpOptions::new())?;
/// assert!(socket.local_addr()?.ip().is_loopback());
/// # Ok(())
/// # }
/// ```
pub mod transport {
    pub use abyss_transport::*;
}

/// Tower middleware for UDP services (re-export of `abyss-middleware`).
///
/// # Example
///
/// Layers stacked by hand, in front of the service:
///
/// ```
/// use std::convert::Infallible;
/// use std::time::Duration;
/// use abyss::middleware::SizeLimitLayer;
/// use abyss::{Request, Server, ServiceBuilder};
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let service = ServiceBuilder::new()
///     .layer(SizeLimitLayer::new(1232)) // DNS's safe UDP size
///     .service_fn(|r: Request| async move { Ok::<_, Infallible>(r.into_payload()) });
/// let handle = Server::bind("127.0.0.1:0")
///     .without_packet_size_limit() // the stack has its own
///     .serve(service)
///     .await?;
///
/// let reply = abyss::client::send_recv(handle.local_addr(), b"query", Duration::from_secs(5)).await?;
/// assert_eq!(reply, "query");
/// handle.shutdown().await;
/// # Ok(())
/// # }
/// ```
pub mod middleware {
    pub use abyss_middleware::*;
}

pub use bytes::{Bytes, BytesMut};
pub use tower::{BoxError, Layer, Service, ServiceBuilder, service_fn};
pub use transport::UdpOptions;

/// The README's examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
