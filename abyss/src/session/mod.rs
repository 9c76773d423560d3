//! Stateful per-peer sessions: the original's `Abyss.Handler` behaviour,
//! with the state actually kept.
//!
//! A [`Session`] is the state one peer's datagrams share. [`Sessions`]
//! routes each datagram to its peer's session (creating it on first
//! contact), runs each session as its own task so one peer's datagrams are
//! handled in order while different peers run concurrently, and ends idle
//! sessions. [`Sessions::service`] is a `tower::Service<Request>`, so
//! sessions sit behind every middleware layer like any other handler.
//!
//! | the original | here |
//! | --- | --- |
//! | `init/1` | the factory given to [`Sessions::builder`] |
//! | `handle_data/2` returning `{:continue, state}` | [`Session::handle`] returning [`Step::keep`] |
//! | `{:continue, state, timeout}` | [`Step::keep_for`] (this wait only) or [`Step::keep_with_idle_timeout`] (from now on) |
//! | `{:close, state}` | [`Step::close`] |
//! | `{:error, reason, state}` | [`Step::error`] |
//! | `handle_timeout/1` | [`Session::on_idle`] |
//! | `handle_close/1` | [`Session::on_close`] |
//! | `handle_error/2` | [`Session::on_error`] |
//! | `handle_shutdown/1` | [`Session::on_shutdown`] |
//! | `read_timeout` (60 s) | [`SessionsBuilder::idle_timeout`] (60 s) |
//! | `num_connections` | [`SessionsBuilder::max_sessions`] |
//!
//! # Bounds
//!
//! * At most `max_sessions` live sessions (default 16 384). A datagram from
//!   a new peer while all are taken is dropped, counted in
//!   [`SessionStats::refused`] and by the server as `overloaded`.
//! * Each session queues at most `queue_size` datagrams (default 64); one
//!   more is dropped, counted in [`SessionStats::queue_full`] and by the
//!   server as `overloaded`.
//! * A session idle for `idle_timeout` (default 60 s) gets
//!   [`Session::on_idle`], which by default closes it. A session's state is
//!   dropped when it ends; the peer's next datagram starts a fresh one.
//!
//! # Shutdown
//!
//! [`Sessions::shutdown`] lets every live session finish the datagrams it
//! has queued, calls its [`Session::on_shutdown`], and waits for all of them.
//! Give it to the server with
//! [`Builder::on_shutdown`](crate::Builder::on_shutdown) so that a graceful
//! server shutdown runs it within the shutdown timeout.
//!
//! # Example
//!
//! ```
//! use abyss::session::{Session, Sessions, Step};
//! use abyss::{Request, Server};
//!
//! /// Counts each peer's datagrams.
//! struct Counter(u64);
//!
//! impl Session for Counter {
//!     async fn handle(&mut self, request: Request) -> Step {
//!         if request.payload().as_ref() == b"bye" {
//!             return Step::close();
//!         }
//!         self.0 += 1;
//!         Step::keep().reply(self.0.to_string())
//!     }
//! }
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let sessions = Sessions::builder(|_peer| Counter(0)).build()?;
//! let handle = Server::bind("127.0.0.1:0")
//!     .on_shutdown({
//!         let sessions = sessions.clone();
//!         move || sessions.clone().shutdown_owned()
//!     })
//!     .serve(sessions.service())
//!     .await?;
//!
//! let client = abyss::client::UdpClient::connect(handle.local_addr()).await?;
//! let timeout = std::time::Duration::from_secs(5);
//! assert_eq!(client.request(b"a", timeout).await?, "1");
//! assert_eq!(client.request(b"b", timeout).await?, "2");
//! handle.shutdown().await;
//! # Ok(())
//! # }
//! ```

mod registry;
mod service;
mod step;

use std::future::Future;
use std::net::SocketAddr;

use crate::{BoxError, Request, SendHandle};

pub use registry::{SessionStats, Sessions, SessionsBuilder};
pub use service::{SessionFuture, SessionService};
pub use step::Step;

/// One peer's state and how it handles that peer's datagrams.
///
/// Every method runs on the session's own task, one at a time, so `&mut
/// self` is all the synchronisation a session needs. A panic in any of them
/// ends the session (counted by the server as `panicked` when it happened
/// while handling a datagram).
pub trait Session: Send + Sized + 'static {
    /// Handles one datagram from the peer, in arrival order. The returned
    /// [`Step`] says whether the session goes on and what to reply.
    fn handle(&mut self, request: Request) -> impl Future<Output = Step> + Send;

    /// The idle timeout passed with no datagram. Return [`Step::keep`] (or
    /// a variant with a new timeout) to stay open; a reply in the step is
    /// sent to the peer. Default: close.
    fn on_idle(&mut self, context: &Context) -> impl Future<Output = Step> + Send {
        let _ = context;
        async { Step::close() }
    }

    /// The session is ending because [`handle`](Session::handle) or
    /// [`on_idle`](Session::on_idle) returned [`Step::close`].
    fn on_close(&mut self, context: &Context) -> impl Future<Output = ()> + Send {
        let _ = context;
        async {}
    }

    /// The session is ending because a step was [`Step::error`].
    fn on_error(&mut self, error: &BoxError, context: &Context) -> impl Future<Output = ()> + Send {
        let _ = (error, context);
        async {}
    }

    /// The server is shutting down; queued datagrams have been handled.
    fn on_shutdown(&mut self, context: &Context) -> impl Future<Output = ()> + Send {
        let _ = context;
        async {}
    }
}

/// What a session's hooks know besides their state: who the peer is and a
/// way to send to it (or anyone) from the server's socket.
#[derive(Debug, Clone)]
pub struct Context {
    peer: SocketAddr,
    sender: SendHandle,
}

impl Context {
    /// The peer this session serves (the address of its first datagram).
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Sends from the socket the session's last datagram came in on.
    pub fn sender(&self) -> &SendHandle {
        &self.sender
    }
}
