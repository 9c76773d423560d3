//! Response rate limiting (RRL), for any protocol: limits the *replies* a
//! network gets of each kind, the defence DNS servers use against being a
//! reflector.
//!
//! A spoofed flood asks the same question in a victim's name, many times:
//! every answer goes to the victim. Limiting requests per source does not
//! stop it when the flood comes from many networks or stays under each
//! source's quota; limiting *identical responses* to one network does,
//! while the victim's own traffic (other questions) goes on. The service
//! says what kind of response each reply is ([`Classify::classify`]: for
//! DNS, the answer's name and type, or "an error"); the layer counts each
//! kind per client network (IPv4 /24, IPv6 /56 by default) and lets
//! `responses_per_second` of them through.
//!
//! Over the limit, a response is dropped, except that every `slip`-th one
//! is replaced by a small reply the service provides ([`Classify::slip`]:
//! for DNS, the answer truncated with TC=1, which makes an honest client
//! retry over TCP, where no address can be spoofed). So a real client
//! whose network shares an address with a flood's victim still gets
//! through, and the victim gets at most half the limited responses, each
//! no bigger than the question.
//!
//! # Semantics, and where they differ from BIND and Knot
//!
//! Defaults follow BIND 9's `rate-limit` clause: `window` 15 s, `slip` 2,
//! prefixes /24 and /56. Each network's account for a kind of response is
//! credited `responses_per_second` a second, holds at most one second of
//! credit, and is debited one per response, *sent or not*, down to a debt
//! of `window` seconds: a network that keeps asking faster than the limit
//! stays limited until it slows down, and is forgiven about `window`
//! seconds after it stops, as in BIND. Each account counts its own limited
//! responses for slip, as BIND does. Differences:
//! - One rate for every kind; BIND has separate `nxdomains-per-second`,
//!   `errors-per-second` and `referrals-per-second` (the classifier can
//!   fold them into kinds, but not give them other rates).
//! - The table of accounts is bounded (`max_tracked`, default 65 536) like
//!   the per-peer rate limiter's: a new account takes the place of an idle
//!   one found in bounded work, or shares an overflow account.
//! - `log_only` counts and logs what would be limited but sends it, as
//!   BIND's `log-only yes`, to tune the rate.
//!
//! Peers a [`Validate`] hook vouches for (DNS cookies, a handshake, an
//! allow list) are exempt: their address is proven, so they cannot be a
//! spoofed victim.
//!
//! Dropped responses fail the datagram with
//! [`error::RateLimited`](crate::error::RateLimited) (counted by the
//! server as `rate_limited`); slipped ones are replies.
//!
//! # Example
//!
//! ```
//! use abyss_middleware::rrl::{Classify, ResponseRateLimit};
//! use bytes::Bytes;
//!
//! /// Replies are classed by their first byte; a slip is a one-byte "busy".
//! struct FirstByte;
//!
//! impl Classify for FirstByte {
//!     type Class = u8;
//!
//!     fn classify(&self, reply: &[u8]) -> Option<u8> {
//!         reply.first().copied()
//!     }
//!
//!     fn slip(&self, _reply: &[u8]) -> Option<Bytes> {
//!         Some(Bytes::from_static(b"B"))
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), abyss_middleware::RateLimitError> {
//! let rrl = ResponseRateLimit::builder(FirstByte, 5).build()?;
//! let layer = rrl.layer(); // after the service: it sees the replies
//! # let _ = layer;
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use governor::nanos::Nanos;
use governor::state::StateStore;
use pin_project_lite::pin_project;
use tower::{BoxError, Layer, Service};

use crate::rate_limit::table::{SharedTable, Table, TableClock};
use crate::rate_limit::{DEFAULT_MAX_TRACKED_PEERS, KeyFn, prefix_key};
use crate::targets::LISTENER;
use crate::{Datagram, DropReason, IntoReply, RateLimitError, Reply, Validate};

/// What kind of response a reply is, and what to send instead of it when
/// a limited one slips. Implemented by the protocol: see the [module
/// docs](self).
pub trait Classify: Send + Sync + 'static {
    /// A kind of response: replies of one kind to one network share an
    /// account.
    type Class: Hash + Eq + Clone + Send + Sync + 'static;

    /// The kind of `reply`; `None` leaves it unlimited.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::rrl::Classify;
    /// use bytes::Bytes;
    ///
    /// /// Limits only replies longer than 100 bytes, all as one kind.
    /// struct Large;
    ///
    /// impl Classify for Large {
    ///     type Class = ();
    ///
    ///     fn classify(&self, reply: &[u8]) -> Option<()> {
    ///         (reply.len() > 100).then_some(())
    ///     }
    ///
    ///     fn slip(&self, _reply: &[u8]) -> Option<Bytes> {
    ///         None // limited replies are dropped, never slipped
    ///     }
    /// }
    ///
    /// assert_eq!(Large.classify(&[0; 200]), Some(()));
    /// assert_eq!(Large.classify(&[0; 20]), None);
    /// ```
    fn classify(&self, reply: &[u8]) -> Option<Self::Class>;

    /// What to send instead of a limited `reply` when it slips (small: the
    /// point is that a victim gets little); `None` drops it.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::rrl::Classify;
    /// use bytes::Bytes;
    ///
    /// /// Slips the reply's first 4 bytes (a header, say).
    /// struct Header;
    ///
    /// impl Classify for Header {
    ///     type Class = ();
    ///
    ///     fn classify(&self, _reply: &[u8]) -> Option<()> {
    ///         Some(())
    ///     }
    ///
    ///     fn slip(&self, reply: &[u8]) -> Option<Bytes> {
    ///         reply.get(..4).map(Bytes::copy_from_slice)
    ///     }
    /// }
    ///
    /// assert_eq!(Header.slip(b"abcdefgh").as_deref(), Some(&b"abcd"[..]));
    /// ```
    fn slip(&self, reply: &[u8]) -> Option<Bytes>;
}

/// Counters of a [`ResponseRateLimit`].
///
/// # Example
///
/// ```
/// use abyss_middleware::rrl::RrlStats;
///
/// let stats = RrlStats::default();
/// assert_eq!(stats.limited(), 0);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RrlStats {
    /// Responses sent within their account's limit.
    pub sent: u64,
    /// Over the limit and dropped.
    pub dropped: u64,
    /// Over the limit and replaced by the classifier's slip reply.
    pub slipped: u64,
    /// Over the limit but sent, in log-only mode.
    pub logged: u64,
    /// To exempt peers, or unclassified: not counted in any account.
    pub unlimited: u64,
}

impl RrlStats {
    /// Responses over their limit, however handled.
    ///
    /// # Example
    ///
    /// ```
    /// let mut stats = abyss_middleware::rrl::RrlStats::default();
    /// stats.dropped = 3;
    /// stats.slipped = 3;
    /// assert_eq!(stats.limited(), 6);
    /// ```
    pub fn limited(&self) -> u64 {
        self.dropped + self.slipped + self.logged
    }
}

/// An account: a client network and a kind of response.
type Key<C> = (IpAddr, C);

/// The low bits of an account's state that count its limited responses
/// since its last slip.
const SLIP_COUNT: u64 = 0xff;

/// What becomes of a response, by its account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Debit {
    /// Within the rate: sent.
    InCredit,
    /// Over it, and the account's turn to slip.
    Slip,
    /// Over it: dropped.
    Drop,
}

struct Shared<C: Classify> {
    classify: C,
    accounts: SharedTable<Key<C::Class>>,
    clock: TableClock,
    /// Nanoseconds one response takes from an account.
    interval: u64,
    /// Most credit an account holds: one second.
    credit: u64,
    /// Most debt an account holds: the window.
    debt: u64,
    slip: u32,
    log_only: bool,
    prefix: Arc<KeyFn<IpAddr>>,
    exempt: Option<Box<dyn Validate>>,
    responses_per_second: u32,
    window: Duration,
    /// When the next log-only line may be written (ns on the clock).
    next_log: AtomicU64,
    sent: AtomicU64,
    dropped: AtomicU64,
    slipped: AtomicU64,
    logged: AtomicU64,
    unlimited: AtomicU64,
}

/// Response rate limiting; see the [module docs](self).
///
/// Cheap to clone: clones share the accounts and counters.
///
/// # Example
///
/// ```
/// use abyss_middleware::rrl::{Classify, ResponseRateLimit};
/// use bytes::Bytes;
///
/// struct All;
///
/// impl Classify for All {
///     type Class = ();
///     fn classify(&self, _reply: &[u8]) -> Option<()> { Some(()) }
///     fn slip(&self, _reply: &[u8]) -> Option<Bytes> { Some(Bytes::from_static(b"TC")) }
/// }
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), abyss_middleware::RateLimitError> {
/// let rrl = ResponseRateLimit::builder(All, 2).build()?;
/// let victim = "192.0.2.7:53".parse().unwrap();
/// let reply = Bytes::from_static(b"a large answer");
/// assert_eq!(rrl.decide(victim, reply.clone()), Ok(reply.clone()));
/// assert_eq!(rrl.decide(victim, reply.clone()), Ok(reply.clone()));
/// // Over 2 a second: dropped, then slipped, then dropped...
/// assert!(rrl.decide(victim, reply.clone()).is_err());
/// assert_eq!(rrl.decide(victim, reply.clone()), Ok(Bytes::from_static(b"TC")));
/// assert_eq!((rrl.stats().dropped, rrl.stats().slipped), (1, 1));
/// # Ok(())
/// # }
/// ```
pub struct ResponseRateLimit<C: Classify> {
    shared: Arc<Shared<C>>,
}

impl<C: Classify> Clone for ResponseRateLimit<C> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<C: Classify> fmt::Debug for ResponseRateLimit<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shared = &self.shared;
        f.debug_struct("ResponseRateLimit")
            .field("responses_per_second", &shared.responses_per_second)
            .field("window", &shared.window)
            .field("slip", &shared.slip)
            .field("log_only", &shared.log_only)
            .finish_non_exhaustive()
    }
}

/// Options of a [`ResponseRateLimit`]; from [`ResponseRateLimit::builder`].
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use abyss_middleware::rrl::{Classify, ResponseRateLimit};
/// # struct All;
/// # impl Classify for All {
/// #     type Class = ();
/// #     fn classify(&self, _reply: &[u8]) -> Option<()> { Some(()) }
/// #     fn slip(&self, _reply: &[u8]) -> Option<bytes::Bytes> { None }
/// # }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), abyss_middleware::RateLimitError> {
/// let rrl = ResponseRateLimit::builder(All, 10)
///     .window(Duration::from_secs(5))
///     .slip(3)
///     .prefixes(24, 48)
///     .build()?;
/// # let _ = rrl;
/// # Ok(())
/// # }
/// ```
pub struct ResponseRateLimitBuilder<C> {
    classify: C,
    responses_per_second: u32,
    window: Duration,
    slip: u32,
    prefixes: (u8, u8),
    log_only: bool,
    exempt: Option<Box<dyn Validate>>,
    max_tracked: usize,
}

impl<C> fmt::Debug for ResponseRateLimitBuilder<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseRateLimitBuilder")
            .field("responses_per_second", &self.responses_per_second)
            .field("window", &self.window)
            .field("slip", &self.slip)
            .field("prefixes", &self.prefixes)
            .field("log_only", &self.log_only)
            .field("max_tracked", &self.max_tracked)
            .finish_non_exhaustive()
    }
}

impl<C: Classify> ResponseRateLimit<C> {
    /// Limits each client network to `responses_per_second` responses of
    /// each kind `classify` tells apart (BIND's `responses-per-second`;
    /// BIND's documentation suggests 5 for an authoritative server).
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::rrl::{Classify, ResponseRateLimit};
    /// # struct All;
    /// # impl Classify for All {
    /// #     type Class = ();
    /// #     fn classify(&self, _reply: &[u8]) -> Option<()> { Some(()) }
    /// #     fn slip(&self, _reply: &[u8]) -> Option<bytes::Bytes> { None }
    /// # }
    ///
    /// let error = ResponseRateLimit::builder(All, 0).build().unwrap_err();
    /// assert_eq!(error.field, "responses_per_second");
    /// ```
    pub fn builder(classify: C, responses_per_second: u32) -> ResponseRateLimitBuilder<C> {
        ResponseRateLimitBuilder {
            classify,
            responses_per_second,
            window: Duration::from_secs(15),
            slip: 2,
            prefixes: (24, 56),
            log_only: false,
            exempt: None,
            max_tracked: DEFAULT_MAX_TRACKED_PEERS,
        }
    }

    /// The layer that applies it. It goes around the service (or the
    /// layers that make replies): it acts on each reply as the inner
    /// service's future resolves, and its responses are `Option<Reply>`,
    /// with the TOS byte the service asked for (a slip reply too: it goes
    /// to the same client, on the same path).
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::rrl::{Classify, ResponseRateLimit};
    /// use tower::ServiceBuilder;
    /// # struct All;
    /// # impl Classify for All {
    /// #     type Class = ();
    /// #     fn classify(&self, _reply: &[u8]) -> Option<()> { Some(()) }
    /// #     fn slip(&self, _reply: &[u8]) -> Option<bytes::Bytes> { None }
    /// # }
    /// # #[derive(Debug)] struct Req;
    /// # impl abyss_middleware::Datagram for Req {
    /// #     fn peer(&self) -> std::net::SocketAddr { ([192, 0, 2, 1], 1).into() }
    /// #     fn local(&self) -> std::net::SocketAddr { ([192, 0, 2, 2], 2).into() }
    /// #     fn payload_len(&self) -> usize { 0 }
    /// # }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), abyss_middleware::RateLimitError> {
    /// let rrl = ResponseRateLimit::builder(All, 5).build()?;
    /// let service = ServiceBuilder::new()
    ///     .layer(rrl.layer())
    ///     .service_fn(|_: Req| async { Ok::<_, std::convert::Infallible>(bytes::Bytes::from_static(b"answer")) });
    /// # let _ = service;
    /// # Ok(())
    /// # }
    /// ```
    pub fn layer(&self) -> ResponseRateLimitLayer<C> {
        ResponseRateLimitLayer { rrl: self.clone() }
    }

    /// Decides what becomes of `reply` to `peer`: sent (`Ok(reply)`),
    /// replaced by the slip reply (`Ok(slip)`), or dropped
    /// (`Err(DropReason::RateLimited)`). The layer calls it for every
    /// reply; call it yourself where a layer does not fit.
    ///
    /// # Example
    ///
    /// See [`ResponseRateLimit`].
    pub fn decide(&self, peer: SocketAddr, reply: Bytes) -> Result<Bytes, DropReason> {
        let shared = &*self.shared;
        if shared.exempt.as_ref().is_some_and(|v| v.is_validated(peer)) {
            shared.unlimited.fetch_add(1, Ordering::Relaxed);
            return Ok(reply);
        }
        let Some(class) = shared.classify.classify(&reply) else {
            shared.unlimited.fetch_add(1, Ordering::Relaxed);
            return Ok(reply);
        };
        let key = ((shared.prefix)(peer), class);
        let debit = self.debit(&key);
        if debit == Debit::InCredit {
            shared.sent.fetch_add(1, Ordering::Relaxed);
            return Ok(reply);
        }
        if shared.log_only {
            shared.logged.fetch_add(1, Ordering::Relaxed);
            self.log_limited(peer);
            return Ok(reply);
        }
        if debit == Debit::Slip
            && let Some(slip) = shared.classify.slip(&reply)
        {
            shared.slipped.fetch_add(1, Ordering::Relaxed);
            return Ok(slip);
        }
        shared.dropped.fetch_add(1, Ordering::Relaxed);
        Err(DropReason::RateLimited)
    }

    /// Debits `key`'s account for one response.
    fn debit(&self, key: &Key<C::Class>) -> Debit {
        let shared = &*self.shared;
        let now = Nanos::from(shared.clock.elapsed()).as_u64();
        // An account is the time its debt is paid off (one interval later
        // for every response, sent or not, never more than the window
        // ahead), to 256 ns, and in the low byte its limited responses
        // since the last slip.
        let outcome: Result<Debit, ()> = shared.accounts.measure_and_replace(key, |state| {
            let state = state.map_or(0, Nanos::as_u64);
            let (paid_off, limited) = (state & !SLIP_COUNT, state & SLIP_COUNT);
            let after =
                (paid_off.max(now) + shared.interval).min(now + shared.credit + shared.debt);
            let (debit, limited) = if after <= now + shared.credit {
                (Debit::InCredit, limited)
            } else if shared.slip > 0 && limited + 1 >= u64::from(shared.slip) {
                (Debit::Slip, 0)
            } else {
                (Debit::Drop, (limited + 1).min(SLIP_COUNT))
            };
            Ok((debit, Nanos::new((after & !SLIP_COUNT) | limited)))
        });
        outcome.unwrap_or(Debit::Drop)
    }

    /// One line per second at most, however many responses are limited.
    fn log_limited(&self, peer: SocketAddr) {
        let shared = &*self.shared;
        let now = Nanos::from(shared.clock.elapsed()).as_u64();
        let next = shared.next_log.load(Ordering::Relaxed);
        if now >= next
            && shared
                .next_log
                .compare_exchange(
                    next,
                    now + 1_000_000_000,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            let logged = shared.logged.load(Ordering::Relaxed);
            tracing::info!(target: LISTENER, %peer, logged, "response over the rate limit, sent (log-only)");
        }
    }

    /// The counters.
    ///
    /// # Example
    ///
    /// See [`ResponseRateLimit`].
    pub fn stats(&self) -> RrlStats {
        let shared = &*self.shared;
        let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
        RrlStats {
            sent: load(&shared.sent),
            dropped: load(&shared.dropped),
            slipped: load(&shared.slipped),
            logged: load(&shared.logged),
            unlimited: load(&shared.unlimited),
        }
    }

    /// Accounts tracked now (at most `max_tracked`).
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::rrl::{Classify, ResponseRateLimit};
    /// # struct All;
    /// # impl Classify for All {
    /// #     type Class = ();
    /// #     fn classify(&self, _reply: &[u8]) -> Option<()> { Some(()) }
    /// #     fn slip(&self, _reply: &[u8]) -> Option<bytes::Bytes> { None }
    /// # }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), abyss_middleware::RateLimitError> {
    /// let rrl = ResponseRateLimit::builder(All, 5).build()?;
    /// let _ = rrl.decide("192.0.2.1:1".parse().unwrap(), bytes::Bytes::from_static(b"a"));
    /// let _ = rrl.decide("192.0.2.200:1".parse().unwrap(), bytes::Bytes::from_static(b"a"));
    /// assert_eq!(rrl.tracked(), 1, "one /24");
    /// # Ok(())
    /// # }
    /// ```
    pub fn tracked(&self) -> usize {
        self.shared.accounts.0.totals().tracked
    }
}

impl<C: Classify> ResponseRateLimitBuilder<C> {
    /// How far into debt an account goes (BIND's `window`, default 15 s):
    /// a network asking faster than the limit stays limited until it has
    /// been quiet for up to this long.
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use abyss_middleware::rrl::{Classify, ResponseRateLimit};
    /// # struct All;
    /// # impl Classify for All {
    /// #     type Class = ();
    /// #     fn classify(&self, _reply: &[u8]) -> Option<()> { Some(()) }
    /// #     fn slip(&self, _reply: &[u8]) -> Option<bytes::Bytes> { None }
    /// # }
    ///
    /// let error = ResponseRateLimit::builder(All, 5)
    ///     .window(Duration::from_secs(3601))
    ///     .build()
    ///     .unwrap_err();
    /// assert_eq!(error.field, "window");
    /// ```
    pub fn window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }

    /// Every `slip`-th limited response of an account is replaced by the
    /// classifier's slip reply instead of dropped (BIND's `slip`, default
    /// 2; 1 slips them all, 0 none; at most 255).
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::rrl::{Classify, ResponseRateLimit};
    /// # struct All;
    /// # impl Classify for All {
    /// #     type Class = ();
    /// #     fn classify(&self, _reply: &[u8]) -> Option<()> { Some(()) }
    /// #     fn slip(&self, _reply: &[u8]) -> Option<bytes::Bytes> { None }
    /// # }
    ///
    /// let never = ResponseRateLimit::builder(All, 5).slip(0);
    /// # let _ = never;
    /// ```
    pub fn slip(mut self, slip: u32) -> Self {
        self.slip = slip;
        self
    }

    /// The client network an account is for: IPv4 addresses cut to `v4`
    /// bits and IPv6 to `v6` (BIND's `ipv4-prefix-length` and
    /// `ipv6-prefix-length`, default 24 and 56).
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::rrl::{Classify, ResponseRateLimit};
    /// # struct All;
    /// # impl Classify for All {
    /// #     type Class = ();
    /// #     fn classify(&self, _reply: &[u8]) -> Option<()> { Some(()) }
    /// #     fn slip(&self, _reply: &[u8]) -> Option<bytes::Bytes> { None }
    /// # }
    ///
    /// let error = ResponseRateLimit::builder(All, 5).prefixes(33, 56).build().unwrap_err();
    /// assert_eq!(error.field, "prefix_v4");
    /// ```
    pub fn prefixes(mut self, v4: u8, v6: u8) -> Self {
        self.prefixes = (v4, v6);
        self
    }

    /// Counts and logs what would be limited, but sends it (BIND's
    /// `log-only yes`): to see what a rate would do before enforcing it.
    /// The log says so at most once a second.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::rrl::{Classify, ResponseRateLimit};
    /// # struct All;
    /// # impl Classify for All {
    /// #     type Class = ();
    /// #     fn classify(&self, _reply: &[u8]) -> Option<()> { Some(()) }
    /// #     fn slip(&self, _reply: &[u8]) -> Option<bytes::Bytes> { None }
    /// # }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), abyss_middleware::RateLimitError> {
    /// let rrl = ResponseRateLimit::builder(All, 1).log_only(true).build()?;
    /// let peer = "192.0.2.1:1".parse().unwrap();
    /// let reply = bytes::Bytes::from_static(b"a");
    /// assert!(rrl.decide(peer, reply.clone()).is_ok());
    /// assert!(rrl.decide(peer, reply.clone()).is_ok(), "sent, though over the limit");
    /// assert_eq!(rrl.stats().logged, 1);
    /// # Ok(())
    /// # }
    /// ```
    pub fn log_only(mut self, on: bool) -> Self {
        self.log_only = on;
        self
    }

    /// Peers `exempt` vouches for are never limited (BIND's `exempt-clients`,
    /// or a DNS cookie that proves the address).
    ///
    /// # Example
    ///
    /// ```
    /// use std::net::SocketAddr;
    /// use abyss_middleware::rrl::{Classify, ResponseRateLimit};
    /// # struct All;
    /// # impl Classify for All {
    /// #     type Class = ();
    /// #     fn classify(&self, _reply: &[u8]) -> Option<()> { Some(()) }
    /// #     fn slip(&self, _reply: &[u8]) -> Option<bytes::Bytes> { None }
    /// # }
    ///
    /// let rrl = ResponseRateLimit::builder(All, 5).exempt(|peer: SocketAddr| peer.ip().is_loopback());
    /// # let _ = rrl;
    /// ```
    pub fn exempt(mut self, exempt: impl Validate) -> Self {
        self.exempt = Some(Box::new(exempt));
        self
    }

    /// Accounts tracked at most (default 65 536); see the [module
    /// docs](self).
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::rrl::{Classify, ResponseRateLimit};
    /// # struct All;
    /// # impl Classify for All {
    /// #     type Class = ();
    /// #     fn classify(&self, _reply: &[u8]) -> Option<()> { Some(()) }
    /// #     fn slip(&self, _reply: &[u8]) -> Option<bytes::Bytes> { None }
    /// # }
    ///
    /// let error = ResponseRateLimit::builder(All, 5).max_tracked(0).build().unwrap_err();
    /// assert_eq!(error.field, "max_tracked");
    /// ```
    pub fn max_tracked(mut self, accounts: usize) -> Self {
        self.max_tracked = accounts;
        self
    }

    /// Checks the options; an error names the one at fault.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::rrl::{Classify, ResponseRateLimit};
    /// # struct All;
    /// # impl Classify for All {
    /// #     type Class = ();
    /// #     fn classify(&self, _reply: &[u8]) -> Option<()> { Some(()) }
    /// #     fn slip(&self, _reply: &[u8]) -> Option<bytes::Bytes> { None }
    /// # }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), abyss_middleware::RateLimitError> {
    /// let rrl = ResponseRateLimit::builder(All, 5).build()?;
    /// # let _ = rrl;
    /// # Ok(())
    /// # }
    /// ```
    pub fn build(self) -> Result<ResponseRateLimit<C>, RateLimitError> {
        let error = RateLimitError::new;
        if self.responses_per_second == 0 {
            return Err(error("responses_per_second", "must be at least 1"));
        }
        if self.window.is_zero() || self.window > Duration::from_secs(3600) {
            return Err(error("window", "must be between 1 ns and 3600 s"));
        }
        let (v4, v6) = self.prefixes;
        if v4 > 32 {
            return Err(error("prefix_v4", "must be at most 32"));
        }
        if v6 > 128 {
            return Err(error("prefix_v6", "must be at most 128"));
        }
        if self.max_tracked == 0 {
            return Err(error("max_tracked", "must be at least 1"));
        }
        if u64::from(self.slip) > SLIP_COUNT {
            return Err(error("slip", "must be at most 255"));
        }
        let base = tokio::time::Instant::now();
        let clock = TableClock::new(base);
        let second = 1_000_000_000u64;
        Ok(ResponseRateLimit {
            shared: Arc::new(Shared {
                classify: self.classify,
                accounts: SharedTable(Arc::new(Table::new(
                    self.max_tracked,
                    TableClock::new(base),
                ))),
                clock,
                interval: (second / u64::from(self.responses_per_second)).max(1),
                credit: second,
                debt: u64::try_from(self.window.as_nanos()).unwrap_or(u64::MAX),
                slip: self.slip,
                log_only: self.log_only,
                prefix: prefix_key(v4, v6),
                exempt: self.exempt,
                responses_per_second: self.responses_per_second,
                window: self.window,
                next_log: AtomicU64::new(0),
                sent: AtomicU64::new(0),
                dropped: AtomicU64::new(0),
                slipped: AtomicU64::new(0),
                logged: AtomicU64::new(0),
                unlimited: AtomicU64::new(0),
            }),
        })
    }
}

/// Applies a [`ResponseRateLimit`]; from [`ResponseRateLimit::layer`].
///
/// # Example
///
/// See [`ResponseRateLimit::layer`].
pub struct ResponseRateLimitLayer<C: Classify> {
    rrl: ResponseRateLimit<C>,
}

impl<C: Classify> Clone for ResponseRateLimitLayer<C> {
    fn clone(&self) -> Self {
        Self {
            rrl: self.rrl.clone(),
        }
    }
}

impl<C: Classify> fmt::Debug for ResponseRateLimitLayer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ResponseRateLimitLayer")
            .field(&self.rrl)
            .finish()
    }
}

impl<S, C: Classify> Layer<S> for ResponseRateLimitLayer<C> {
    type Service = ResponseRateLimitService<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        ResponseRateLimitService {
            inner,
            rrl: self.rrl.clone(),
        }
    }
}

/// A service whose replies are response-rate-limited; from
/// [`ResponseRateLimitLayer`].
///
/// # Example
///
/// See [`ResponseRateLimit::layer`].
pub struct ResponseRateLimitService<S, C: Classify> {
    inner: S,
    rrl: ResponseRateLimit<C>,
}

impl<S: Clone, C: Classify> Clone for ResponseRateLimitService<S, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            rrl: self.rrl.clone(),
        }
    }
}

impl<S: fmt::Debug, C: Classify> fmt::Debug for ResponseRateLimitService<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseRateLimitService")
            .field("inner", &self.inner)
            .field("rrl", &self.rrl)
            .finish()
    }
}

impl<S, R, C> Service<R> for ResponseRateLimitService<S, C>
where
    S: Service<R>,
    S::Response: IntoReply,
    S::Error: Into<BoxError>,
    R: Datagram,
    C: Classify,
{
    /// The reply (or slip reply), with the TOS byte the inner service
    /// asked for.
    type Response = Option<Reply>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: R) -> Self::Future {
        let peer = request.peer();
        ResponseFuture {
            inner: self.inner.call(request),
            rrl: self.rrl.clone(),
            peer,
        }
    }
}

pin_project! {
    /// Response future of [`ResponseRateLimitService`]: the inner
    /// service's reply, its slip reply, or [`DropReason::RateLimited`]'s
    /// error.
    ///
    /// # Example
    ///
    /// See [`ResponseRateLimit::layer`].
    pub struct ResponseFuture<F, C: Classify> {
        #[pin]
        inner: F,
        rrl: ResponseRateLimit<C>,
        peer: SocketAddr,
    }
}

impl<F, T, E, C> Future for ResponseFuture<F, C>
where
    F: Future<Output = Result<T, E>>,
    T: IntoReply,
    E: Into<BoxError>,
    C: Classify,
{
    type Output = Result<Option<Reply>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx)).map_err(Into::into)?;
        let tos = response.tos();
        let Some(reply) = response.into_reply() else {
            return Poll::Ready(Ok(None));
        };
        Poll::Ready(match this.rrl.decide(*this.peer, reply) {
            Ok(payload) => Ok(Some(match tos {
                Some(tos) => Reply::new(payload).with_tos(tos),
                None => Reply::new(payload),
            })),
            Err(reason) => {
                tracing::debug!(target: LISTENER, peer = %this.peer, "response_rate_limited");
                Err(reason.into_error())
            }
        })
    }
}
