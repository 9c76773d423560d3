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
//! | (none) | [`Session::on_evict`] |
//! | `read_timeout` (60 s) | [`SessionsBuilder::idle_timeout`] (60 s) |
//! | `num_connections` | [`SessionsBuilder::max_sessions`] |
//!
//! # Bounds
//!
//! * At most `max_sessions` live sessions (default 16 384), and at most
//!   `max_sessions_per_source` of them (default a sixteenth) from one source:
//!   an IPv4 address, or an IPv6 /64.
//! * When all are taken, a new peer evicts the least recently active
//!   session of the source holding the most, if that source holds at least
//!   two more than the newcomer's: shares only get more even, so one host
//!   or a few cannot keep newcomers out, while a table full of sources
//!   holding one session each refuses newcomers rather than churn. The
//!   evicted session handles what it has queued, then gets
//!   [`Session::on_evict`] ([`SessionStats::evicted`]); a session handling
//!   a datagram is not evicted while others are idle. "Least recently
//!   active" is exact for a source holding up to 64 sessions, and among 64
//!   of them (a sample that moves on at each eviction) beyond. Under a
//!   spoofed flood from many sources, sources holding several sessions (a
//!   NAT) are evened down towards the newcomers' share. While an evicted
//!   session finishes its queue, its peer's next datagram may start a
//!   fresh session: for that moment the peer has two, and the table one
//!   more than `max_sessions`. A datagram that can start no session is
//!   dropped, counted in [`SessionStats::refused`] and by the server as
//!   `overloaded`.
//! * Each session queues at most `queue_size` datagrams (default 64); one
//!   more is dropped, counted in [`SessionStats::queue_full`] and by the
//!   server as `overloaded`.
//! * A session idle for `idle_timeout` (default 60 s) gets
//!   [`Session::on_idle`], which by default closes it. A session's state is
//!   dropped when it ends; the peer's next datagram starts a fresh one.
//!
//! # Cost
//!
//! A live session holds about 1.7 KiB of heap on a 64-bit target (its
//! task, its slot in the table and a queue sized to what it holds), plus
//! its state. A datagram to a live session locks one of 64 shards of the
//! table, chosen by its key's hash, and its session's queue; starting or
//! ending a session also locks the table's ledger of sources, briefly
//! (an eviction scans the sessions of one source, at most
//! `max_sessions_per_source`).
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
//!         move || sessions.shutdown()
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
///
/// Only [`handle`](Session::handle) is required; the hooks default to
/// closing an idle session and doing nothing when one ends.
///
/// # Example
///
/// A login: the first datagram names the user, later ones are echoed with
/// it; a session quiet for 30 s says goodbye and closes.
///
/// ```
/// use std::time::Duration;
/// use abyss::session::{Session, SessionContext, Sessions, Step};
/// use abyss::{Request, Server};
///
/// #[derive(Default)]
/// struct Login {
///     user: Option<String>,
/// }
///
/// impl Session for Login {
///     async fn handle(&mut self, request: Request) -> Step {
///         let text = String::from_utf8_lossy(request.payload()).into_owned();
///         match &self.user {
///             None => {
///                 let reply = format!("hello {text}");
///                 self.user = Some(text);
///                 Step::keep_for(Duration::from_secs(30)).reply(reply)
///             }
///             Some(user) => Step::keep().reply(format!("{user}: {text}")),
///         }
///     }
///
///     async fn on_idle(&mut self, context: &SessionContext) -> Step {
///         let _ = context.sender().send_to(context.peer(), b"bye").await;
///         Step::close()
///     }
/// }
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let sessions = Sessions::builder(|_peer| Login::default()).build()?;
/// let handle = Server::bind("127.0.0.1:0").serve(sessions.service()).await?;
///
/// let client = abyss::client::UdpClient::connect(handle.local_addr()).await?;
/// let timeout = Duration::from_secs(5);
/// assert_eq!(client.request(b"ada", timeout).await?, "hello ada");
/// assert_eq!(client.request(b"hi", timeout).await?, "ada: hi");
/// handle.shutdown().await;
/// # Ok(())
/// # }
/// ```
pub trait Session: Send + Sized + 'static {
    /// Handles one datagram from the peer, in arrival order. The returned
    /// [`Step`] says whether the session goes on and what to reply.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss::session::{Session, Step};
    /// use abyss::Request;
    ///
    /// /// Sums the numbers a peer sends; `end` closes with the total.
    /// struct Sum(i64);
    ///
    /// impl Session for Sum {
    ///     async fn handle(&mut self, request: Request) -> Step {
    ///         let text = String::from_utf8_lossy(request.payload());
    ///         if text == "end" {
    ///             return Step::close().reply(self.0.to_string());
    ///         }
    ///         match text.trim().parse::<i64>() {
    ///             Ok(n) => {
    ///                 self.0 += n;
    ///                 Step::keep()
    ///             }
    ///             Err(error) => Step::error(error),
    ///         }
    ///     }
    /// }
    /// ```
    fn handle(&mut self, request: Request) -> impl Future<Output = Step> + Send;

    /// The idle timeout passed with no datagram. Return [`Step::keep`] (or
    /// a variant with a new timeout) to stay open; a reply in the step is
    /// sent to the peer. Default: close.
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use abyss::session::{Session, SessionContext, Step};
    /// use abyss::Request;
    ///
    /// /// Pings a quiet peer twice before giving up on it.
    /// struct Patient {
    ///     pings: u32,
    /// }
    ///
    /// impl Session for Patient {
    ///     async fn handle(&mut self, _request: Request) -> Step {
    ///         self.pings = 0;
    ///         Step::keep()
    ///     }
    ///
    ///     async fn on_idle(&mut self, _context: &SessionContext) -> Step {
    ///         self.pings += 1;
    ///         if self.pings > 2 {
    ///             return Step::close();
    ///         }
    ///         Step::keep_for(Duration::from_secs(5)).reply("ping")
    ///     }
    /// }
    /// ```
    fn on_idle(&mut self, context: &SessionContext) -> impl Future<Output = Step> + Send {
        let _ = context;
        async { Step::close() }
    }

    /// The session is ending because [`handle`](Session::handle) or
    /// [`on_idle`](Session::on_idle) returned [`Step::close`].
    ///
    /// # Example
    ///
    /// ```
    /// use abyss::session::{Session, SessionContext, Step};
    /// use abyss::Request;
    ///
    /// struct Chat;
    ///
    /// impl Session for Chat {
    ///     async fn handle(&mut self, request: Request) -> Step {
    ///         if request.payload().as_ref() == b"quit" {
    ///             return Step::close();
    ///         }
    ///         Step::keep()
    ///     }
    ///
    ///     async fn on_close(&mut self, context: &SessionContext) {
    ///         let _ = context.sender().send_to(context.peer(), b"goodbye").await;
    ///     }
    /// }
    /// ```
    fn on_close(&mut self, context: &SessionContext) -> impl Future<Output = ()> + Send {
        let _ = context;
        async {}
    }

    /// The session is ending because a step was [`Step::error`].
    ///
    /// # Example
    ///
    /// ```
    /// use abyss::session::{Session, SessionContext, Step};
    /// use abyss::{BoxError, Request};
    ///
    /// struct Strict;
    ///
    /// impl Session for Strict {
    ///     async fn handle(&mut self, request: Request) -> Step {
    ///         match std::str::from_utf8(request.payload()) {
    ///             Ok(_) => Step::keep(),
    ///             Err(error) => Step::error(error),
    ///         }
    ///     }
    ///
    ///     async fn on_error(&mut self, error: &BoxError, context: &SessionContext) {
    ///         eprintln!("{} sent something that is not UTF-8: {error}", context.peer());
    ///     }
    /// }
    /// ```
    fn on_error(
        &mut self,
        error: &BoxError,
        context: &SessionContext,
    ) -> impl Future<Output = ()> + Send {
        let _ = (error, context);
        async {}
    }

    /// The session was evicted to make room for a new peer while
    /// `max_sessions` were live: it was the least recently active session
    /// of the source holding the most
    /// ([`SessionsBuilder::max_sessions`]). Queued datagrams have been
    /// handled; the peer's next datagram starts a fresh session, if there
    /// is room.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss::session::{Session, SessionContext, Step};
    /// use abyss::Request;
    ///
    /// struct Polite;
    ///
    /// impl Session for Polite {
    ///     async fn handle(&mut self, _request: Request) -> Step {
    ///         Step::keep()
    ///     }
    ///
    ///     async fn on_evict(&mut self, context: &SessionContext) {
    ///         let _ = context.sender().send_to(context.peer(), b"busy, start over").await;
    ///     }
    /// }
    /// ```
    fn on_evict(&mut self, context: &SessionContext) -> impl Future<Output = ()> + Send {
        let _ = context;
        async {}
    }

    /// The server is shutting down; queued datagrams have been handled.
    ///
    /// Called for every live session by [`Sessions::shutdown`].
    ///
    /// # Example
    ///
    /// ```
    /// use abyss::session::{Session, SessionContext, Step};
    /// use abyss::Request;
    ///
    /// struct Notified;
    ///
    /// impl Session for Notified {
    ///     async fn handle(&mut self, _request: Request) -> Step {
    ///         Step::keep()
    ///     }
    ///
    ///     async fn on_shutdown(&mut self, context: &SessionContext) {
    ///         // Tell the peer to reconnect later rather than time out.
    ///         let _ = context.sender().send_to(context.peer(), b"server going down").await;
    ///     }
    /// }
    /// ```
    fn on_shutdown(&mut self, context: &SessionContext) -> impl Future<Output = ()> + Send {
        let _ = context;
        async {}
    }
}

/// What a session's hooks know besides their state: who the peer is and a
/// way to send to it (or anyone) from the server's socket.
///
/// # Example
///
/// ```
/// use abyss::session::{Session, SessionContext, Step};
/// use abyss::Request;
///
/// struct Announcer;
///
/// impl Session for Announcer {
///     async fn handle(&mut self, _request: Request) -> Step {
///         Step::keep()
///     }
///
///     async fn on_idle(&mut self, context: &SessionContext) -> Step {
///         // A reply in the step would go to the peer too; the sender can
///         // reach anyone, from the socket the session's last datagram
///         // came in on.
///         let _ = context.sender().send_to(context.peer(), b"still there?").await;
///         Step::keep()
///     }
/// }
/// ```
#[derive(Debug, Clone)]
pub struct SessionContext {
    peer: SocketAddr,
    sender: SendHandle,
}

impl SessionContext {
    /// The peer this session serves (the address of its first datagram).
    ///
    /// # Example
    ///
    /// ```
    /// use abyss::session::{Session, SessionContext, Step};
    /// use abyss::Request;
    ///
    /// struct Logged;
    ///
    /// impl Session for Logged {
    ///     async fn handle(&mut self, _request: Request) -> Step {
    ///         Step::keep()
    ///     }
    ///
    ///     async fn on_close(&mut self, context: &SessionContext) {
    ///         println!("{} left", context.peer());
    ///     }
    /// }
    /// ```
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Sends from the socket the session's last datagram came in on.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss::session::{Session, SessionContext, Step};
    /// use abyss::Request;
    ///
    /// /// Tells a monitor about every session that ends in error.
    /// struct Monitored;
    ///
    /// impl Session for Monitored {
    ///     async fn handle(&mut self, _request: Request) -> Step {
    ///         Step::error("unexpected datagram")
    ///     }
    ///
    ///     async fn on_error(&mut self, error: &abyss::BoxError, context: &SessionContext) {
    ///         let monitor = "192.0.2.100:9999".parse().unwrap();
    ///         let report = format!("{}: {error}", context.peer());
    ///         let _ = context.sender().send_to(monitor, report.as_bytes()).await;
    ///     }
    /// }
    /// ```
    pub fn sender(&self) -> &SendHandle {
        &self.sender
    }
}
