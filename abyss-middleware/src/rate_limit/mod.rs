//! Per-peer rate limiting (the original's `rate_limit_enabled`,
//! `rate_limit_max_packets`, `rate_limit_window_ms`), done with GCRA.
//!
//! [`PeerRateLimiter`] is the shared state: a quota, a key function and a
//! bounded table of peers. [`PeerRateLimiter::layer`] gives the layer to put
//! in a stack; the limiter itself stays with you to change the quota while
//! serving ([`PeerRateLimiter::set_quota`], the original's `update_config`)
//! and to read [`RateLimitStats`].
//!
//! # Why not `tower_governor`
//!
//! `tower_governor` only accepts `http::Request`. The algorithm underneath it
//! is the [`governor`] crate's GCRA, which takes any key: this layer uses it
//! directly, keyed by peer, with its own bounded table as the state store.
//!
//! # Quota
//!
//! [`RateQuota`] is N datagrams per window, with a burst (default N). GCRA
//! spaces the allowance evenly: a peer may send `burst` datagrams at once,
//! then one every `window / N`. Against 10 per second with a burst of 10, a
//! peer sending 20 per second for 3 s gets about 40 through (the burst, plus
//! 10 per second), not the 10 the original's fixed-window refill let
//! through.
//!
//! # Keys
//!
//! By default a peer is its IP address cut to a prefix: IPv4 /32 and IPv6
//! /64, since one IPv6 host owns a whole /64. Change the prefixes with
//! [`PeerRateLimiterBuilder::prefixes`], or key by anything derived from the peer
//! address with [`PeerRateLimiterBuilder::with_key`].
//!
//! # Bounded memory
//!
//! At most `max_tracked_peers` keys are kept (default 65 536). A key whose
//! allowance has fully refilled carries no information, so when the table is
//! full a new peer takes the place of such an idle key: it looks at the next
//! 8 keys from a hand that sweeps round its shard (CLOCK), so each new peer
//! costs a bounded amount of work, with no scan of the table under its lock.
//! If none of them is idle, the new peer shares an overflow allowance with
//! the other newcomers (one allowance per shard of the table; there are at
//! most 64 shards) until room frees up, so a flood of spoofed sources can
//! neither grow memory nor escape the limit, and a datagram it gets dropped
//! for allocates nothing.
//!
//! Limited datagrams fail with [`error::RateLimited`](crate::error::RateLimited)
//! (found by [`drop_reason`](crate::drop_reason) as
//! [`DropReason::RateLimited`](crate::DropReason::RateLimited)), get no
//! reply, and are traced as `rate_limit_exceeded` (target
//! `abyss::listener`, with the peer).
//!
//! # Example
//!
//! ```
//! use abyss_middleware::{PeerRateLimiter, RateQuota};
//! use tower::ServiceBuilder;
//! # #[derive(Debug)] struct Req;
//! # impl abyss_middleware::Datagram for Req {
//! #     fn peer(&self) -> std::net::SocketAddr { ([192, 0, 2, 1], 1).into() }
//! #     fn local(&self) -> std::net::SocketAddr { ([192, 0, 2, 2], 2).into() }
//! #     fn payload_len(&self) -> usize { 0 }
//! # }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // 20 a second per /32 or /64, bursts of 40.
//! let limiter = PeerRateLimiter::new(RateQuota::per_second(20).with_burst(40)).unwrap();
//! let service = ServiceBuilder::new()
//!     .layer(limiter.layer())
//!     .service_fn(|_: Req| async { Ok::<_, std::convert::Infallible>(()) });
//! # let _ = service;
//!
//! // Later, while serving:
//! limiter.set_quota(RateQuota::per_second(5)).unwrap();
//! println!("{} peers tracked", limiter.stats().tracked_peers);
//! # }
//! ```

mod layer;
mod limiter;
mod quota;
mod service;
pub(crate) mod table;

pub use crate::future::ResponseFuture;
pub use layer::PeerRateLimitLayer;
pub use limiter::{
    DEFAULT_MAX_TRACKED_PEERS, PeerRateLimiter, PeerRateLimiterBuilder, RateLimitStats,
};
pub(crate) use limiter::{KeyFn, prefix_key};
pub use quota::{RateLimitError, RateQuota};
pub use service::PeerRateLimit;
