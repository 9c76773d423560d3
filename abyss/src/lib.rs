#![doc = include_str!("docs/crate.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod client;
mod error;
mod request;
mod server;
pub mod session;
mod signal;

pub use abyss_middleware::IntoReply;
pub use error::Error;
pub use request::{Request, SendHandle};
pub use server::{
    Builder, DEFAULT_MAX_DATAGRAM_SIZE, DEFAULT_MAX_IN_FLIGHT, DEFAULT_MAX_PACKET_SIZE,
    DEFAULT_SHUTDOWN_TIMEOUT, Dispatch, DrainReport, Drops, Server, ServerHandle, ServerState,
    Stats,
};
pub use signal::shutdown_signal;

/// The transport layer: the [`Transport`](transport::Transport) trait, UDP
/// sockets and their options (re-export of `abyss-transport`).
pub mod transport {
    pub use abyss_transport::*;
}

/// Tower middleware for UDP services (re-export of `abyss-middleware`).
pub mod middleware {
    pub use abyss_middleware::*;
}

pub use bytes::Bytes;
pub use tower::{BoxError, Layer, Service, ServiceBuilder, service_fn};
pub use transport::UdpOptions;

/// The README's examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
