//! Tower middleware for [Abyss](https://docs.rs/abyss) UDP services.
//!
//! Every layer works standalone with [`tower::ServiceBuilder`]; the Abyss
//! server's builder options (`max_packet_size`, `rate_limit`, `timeout`,
//! `concurrency_shed`, `trace`) are shortcuts that stack these same layers.
//!
//! | layer | drops with | counted by the server as |
//! | --- | --- | --- |
//! | [`SizeLimitLayer`] | payload over N bytes | `too_large` |
//! | [`PeerRateLimitLayer`] | peer over its GCRA quota | `rate_limited` |
//! | tower's [`TimeoutLayer`](tower::timeout::TimeoutLayer) | handling took too long | `timed_out` |
//! | [`ConcurrencyShedLayer`] | N requests already in flight | `overloaded` |
//! | [`TraceLayer`] | (never drops) a span per datagram | |
//! | [`IpFilterLayer`] | peer outside the allow list or inside the deny list | `denied` |
//! | [`AmplificationGuardLayer`] | reply over k times the request to an unvalidated peer | `amplification` |
//!
//! A UDP server has no error response to send: a refused datagram is simply
//! not answered. What matters is that every refused datagram is counted once,
//! under one reason. Layers do that by failing the request with the
//! zero-sized error of a [`DropReason`] ([`DropReason::into_error`], see
//! [`error`]), so a drop allocates nothing; a service can do the same, or
//! use [`Dropped`]. The server recognises them (and tower's own `Elapsed`
//! and `Overloaded`) with [`drop_reason`].
//!
//! Layers that look at the peer or the payload size take any request that
//! implements [`Datagram`]; `abyss::Request` does.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use abyss_middleware::{
//!     ConcurrencyShedLayer, PeerRateLimiter, RateQuota, SizeLimitLayer, TraceLayer,
//! };
//! use tower::ServiceBuilder;
//! # use std::net::SocketAddr;
//! # #[derive(Debug)]
//! # struct Req;
//! # impl abyss_middleware::Datagram for Req {
//! #     fn peer(&self) -> SocketAddr { "192.0.2.1:1".parse().unwrap() }
//! #     fn local(&self) -> SocketAddr { "192.0.2.2:2".parse().unwrap() }
//! #     fn payload_len(&self) -> usize { 3 }
//! # }
//!
//! let limiter = PeerRateLimiter::new(RateQuota::per_second(100).with_burst(200)).unwrap();
//! let service = ServiceBuilder::new()
//!     .layer(TraceLayer::new())
//!     .layer(SizeLimitLayer::new(1232))
//!     .layer(limiter.layer())
//!     .layer(ConcurrencyShedLayer::new(1024))
//!     .timeout(Duration::from_secs(2))
//!     .service_fn(|_request: Req| async { Ok::<_, std::convert::Infallible>(()) });
//! # let _ = service;
//! ```

#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod amplification;
pub mod budget;
pub mod concurrency;
mod drop;
pub mod error;
pub mod filter;
pub mod rate_limit;
mod reply;
pub mod rrl;
pub mod size_limit;
pub mod trace;

mod datagram;
mod future;

pub use amplification::{AmplificationGuardLayer, Validate};
pub use budget::{BudgetStats, ReplyBudget, ReplyBudgetBuilder, ReplyBudgetLayer};
pub use concurrency::ConcurrencyShedLayer;
pub use datagram::Datagram;
pub use drop::{DropReason, Dropped, drop_reason};
pub use filter::IpFilterLayer;
pub use rate_limit::{
    PeerRateLimitLayer, PeerRateLimiter, PeerRateLimiterBuilder, RateLimitError, RateLimitStats,
    RateQuota,
};
pub use reply::{IntoReply, Reply};
pub use size_limit::SizeLimitLayer;
pub use trace::TraceLayer;

/// The tracing targets of Abyss's events, matching the original's
/// `[:abyss, :listener, ...]` and `[:abyss, :connection, ...]` telemetry
/// families; filter on them (`RUST_LOG=abyss::connection=trace`).
///
/// # Example
///
/// ```
/// use abyss_middleware::targets;
///
/// // Every drop decision, at any level; per-datagram events from INFO up.
/// let filter = format!("{}=trace,{}=info", targets::LISTENER, targets::CONNECTION);
/// assert_eq!(filter, "abyss::listener=trace,abyss::connection=info");
/// ```
pub mod targets {
    /// Listener-wide events, and the layers' drop decisions.
    ///
    /// # Example
    ///
    /// ```
    /// assert_eq!(abyss_middleware::targets::LISTENER, "abyss::listener");
    /// ```
    pub const LISTENER: &str = "abyss::listener";
    /// Per-datagram events.
    ///
    /// # Example
    ///
    /// ```
    /// assert_eq!(abyss_middleware::targets::CONNECTION, "abyss::connection");
    /// ```
    pub const CONNECTION: &str = "abyss::connection";
}
