//! A budget for a whole server's replies: at most so many replies, and so
//! many reply bytes, per second, whatever their sources.
//!
//! A per-peer rate limit cannot see a flood spread over many sources: with
//! spoofed addresses, each source stays under its own quota and every
//! datagram is answered, so the server reflects as much as it is sent. A
//! [`ReplyBudget`] caps the total. A reply over it is not sent; the datagram
//! fails with [`error::OverBudget`](crate::error::OverBudget)
//! ([`DropReason::OverBudget`](crate::DropReason::OverBudget)) and the server counts it as `over_budget`.
//!
//! Peers that [`Validate`] vouches for (those that proved they own their
//! address: a handshake, a DNS cookie, an allow list) are exempt, so a
//! flood spoofing other sources cannot crowd them out. Their replies are
//! not counted against the budget either.
//!
//! Each budget refills continuously (a GCRA) and holds at most one second
//! of it, so a quiet second cannot be saved up for a burst of more than
//! one second's replies. A reply is sent only if it fits both budgets, and
//! only then spends them: one refused spends nothing.
//!
//! # Example
//!
//! ```
//! use abyss_middleware::ReplyBudget;
//! use std::net::SocketAddr;
//!
//! let trusted: std::net::IpAddr = "192.0.2.10".parse().unwrap();
//! let budget = ReplyBudget::builder()
//!     .replies_per_second(10_000)
//!     .bytes_per_second(10_000_000)
//!     .exempt(move |peer: SocketAddr| peer.ip() == trusted)
//!     .build()?;
//! let layer = budget.layer(); // after the service: it sees the replies
//! # let _ = layer;
//! # Ok::<(), abyss_middleware::RateLimitError>(())
//! ```

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tower::{BoxError, Layer, Service};

use crate::future::ReplyRule;
use crate::{Datagram, IntoReply, RateLimitError, Validate};

/// What `units` take of a budget of `per_second`, in nanoseconds.
fn cost(units: u64, per_second: u32) -> u64 {
    let ns = u128::from(units) * u128::from(SECOND) / u128::from(per_second);
    u64::try_from(ns).unwrap_or(u64::MAX)
}

/// Nanoseconds in the second of burst each budget holds.
const SECOND: u64 = 1_000_000_000;

/// The two budgets' state: when each is next fully spent, in nanoseconds
/// since `base` (a GCRA's theoretical arrival time). Both are checked,
/// and both spent, under one lock: a reply refused by one spends neither.
#[derive(Debug, Default)]
struct Tats {
    replies: u64,
    bytes: u64,
}

/// A budget of replies per second for a whole server; see the [module
/// docs](self).
///
/// Cheap to clone: clones share the budget and its counters, so one budget
/// given to several servers caps them together.
///
/// # Example
///
/// ```
/// use abyss_middleware::ReplyBudget;
///
/// let budget = ReplyBudget::builder().replies_per_second(2).build()?;
/// let peer = "192.0.2.1:5000".parse().unwrap();
/// assert!(budget.spend(peer, 100));
/// assert!(budget.spend(peer, 100));
/// assert!(!budget.spend(peer, 100), "the second's two replies are spent");
/// assert_eq!(budget.stats().over_budget, 1);
/// # Ok::<(), abyss_middleware::RateLimitError>(())
/// ```
#[derive(Clone)]
pub struct ReplyBudget {
    shared: Arc<Shared>,
}

struct Shared {
    /// Replies per second, and bytes per second.
    replies: Option<u32>,
    bytes: Option<u32>,
    /// What one reply takes of the replies' second, in nanoseconds.
    reply_cost: Option<u64>,
    tats: Mutex<Tats>,
    base: tokio::time::Instant,
    exempt: Option<Box<dyn Validate>>,
    sent: AtomicU64,
    exempted: AtomicU64,
    over_budget: AtomicU64,
}

impl fmt::Debug for ReplyBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplyBudget")
            .field("replies_per_second", &self.shared.replies)
            .field("bytes_per_second", &self.shared.bytes)
            .field("exempt", &self.shared.exempt.is_some())
            .finish_non_exhaustive()
    }
}

/// Counters of a [`ReplyBudget`].
///
/// # Example
///
/// ```
/// use abyss_middleware::ReplyBudget;
///
/// let budget = ReplyBudget::builder().replies_per_second(100).build()?;
/// assert_eq!(budget.stats(), Default::default());
/// # Ok::<(), abyss_middleware::RateLimitError>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BudgetStats {
    /// Replies let through within the budget.
    pub sent: u64,
    /// Replies to exempt peers, let through uncounted.
    pub exempted: u64,
    /// Replies withheld: over the budget.
    pub over_budget: u64,
}

/// Options of a [`ReplyBudget`]; from [`ReplyBudget::builder`].
///
/// # Example
///
/// ```
/// use abyss_middleware::ReplyBudget;
///
/// let budget = ReplyBudget::builder()
///     .replies_per_second(50_000)
///     .bytes_per_second(40_000_000)
///     .build()?;
/// # let _ = budget;
/// # Ok::<(), abyss_middleware::RateLimitError>(())
/// ```
#[derive(Default)]
pub struct ReplyBudgetBuilder {
    replies: Option<u32>,
    bytes: Option<u32>,
    exempt: Option<Box<dyn Validate>>,
}

impl fmt::Debug for ReplyBudgetBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplyBudgetBuilder")
            .field("replies_per_second", &self.replies)
            .field("bytes_per_second", &self.bytes)
            .field("exempt", &self.exempt.is_some())
            .finish()
    }
}

impl ReplyBudget {
    /// Options for a budget; set at least one of replies or bytes.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::ReplyBudget;
    ///
    /// let error = ReplyBudget::builder().build().unwrap_err();
    /// assert_eq!(error.field, "replies_per_second");
    /// ```
    pub fn builder() -> ReplyBudgetBuilder {
        ReplyBudgetBuilder::default()
    }

    /// The layer that withholds replies over this budget. Put it after the
    /// handler's layers that make replies, and before the ones that only
    /// look at requests, or anywhere: it acts on the reply when the inner
    /// service's future resolves.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::ReplyBudget;
    /// use tower::ServiceBuilder;
    /// # #[derive(Debug)] struct Req;
    /// # impl abyss_middleware::Datagram for Req {
    /// #     fn peer(&self) -> std::net::SocketAddr { ([192, 0, 2, 1], 1).into() }
    /// #     fn local(&self) -> std::net::SocketAddr { ([192, 0, 2, 2], 2).into() }
    /// #     fn payload_len(&self) -> usize { 0 }
    /// # }
    ///
    /// let budget = ReplyBudget::builder().replies_per_second(1000).build()?;
    /// let service = ServiceBuilder::new()
    ///     .layer(budget.layer())
    ///     .service_fn(|_: Req| async { Ok::<_, std::convert::Infallible>(bytes::Bytes::from_static(b"hi")) });
    /// # let _ = service;
    /// # Ok::<(), abyss_middleware::RateLimitError>(())
    /// ```
    pub fn layer(&self) -> ReplyBudgetLayer {
        ReplyBudgetLayer {
            budget: self.clone(),
        }
    }

    /// Spends the budget for a reply of `bytes` to `peer`: whether it may
    /// be sent. Exempt peers always may, and spend nothing.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::ReplyBudget;
    ///
    /// let budget = ReplyBudget::builder().bytes_per_second(1000).build()?;
    /// let peer = "192.0.2.1:5000".parse().unwrap();
    /// assert!(budget.spend(peer, 600));
    /// assert!(!budget.spend(peer, 600), "400 bytes left this second");
    /// assert!(budget.spend(peer, 400));
    /// # Ok::<(), abyss_middleware::RateLimitError>(())
    /// ```
    pub fn spend(&self, peer: SocketAddr, bytes: usize) -> bool {
        let shared = &*self.shared;
        if shared.exempt.as_ref().is_some_and(|v| v.is_validated(peer)) {
            shared.exempted.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        let fits = shared.fits(bytes);
        let counter = if fits {
            &shared.sent
        } else {
            &shared.over_budget
        };
        counter.fetch_add(1, Ordering::Relaxed);
        fits
    }

    /// The counters.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::ReplyBudget;
    ///
    /// let budget = ReplyBudget::builder()
    ///     .replies_per_second(1)
    ///     .exempt(|peer: std::net::SocketAddr| peer.ip().is_loopback())
    ///     .build()?;
    /// budget.spend("192.0.2.1:1".parse().unwrap(), 10);
    /// budget.spend("192.0.2.1:1".parse().unwrap(), 10);
    /// budget.spend("127.0.0.1:1".parse().unwrap(), 10);
    /// let stats = budget.stats();
    /// assert_eq!((stats.sent, stats.over_budget, stats.exempted), (1, 1, 1));
    /// # Ok::<(), abyss_middleware::RateLimitError>(())
    /// ```
    pub fn stats(&self) -> BudgetStats {
        let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
        BudgetStats {
            sent: load(&self.shared.sent),
            exempted: load(&self.shared.exempted),
            over_budget: load(&self.shared.over_budget),
        }
    }
}

impl ReplyBudgetBuilder {
    /// Replies per second at most, to peers that are not exempt.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::ReplyBudget;
    ///
    /// let budget = ReplyBudget::builder().replies_per_second(10_000).build()?;
    /// # let _ = budget;
    /// let error = ReplyBudget::builder().replies_per_second(0).build().unwrap_err();
    /// assert_eq!(error.field, "replies_per_second");
    /// # Ok::<(), abyss_middleware::RateLimitError>(())
    /// ```
    pub fn replies_per_second(mut self, replies: u32) -> Self {
        self.replies = Some(replies);
        self
    }

    /// Reply bytes (UDP payload) per second at most, to peers that are not
    /// exempt. A reply larger than a second's budget is never sent.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::ReplyBudget;
    ///
    /// let budget = ReplyBudget::builder().bytes_per_second(8_000_000).build()?;
    /// # let _ = budget;
    /// # Ok::<(), abyss_middleware::RateLimitError>(())
    /// ```
    pub fn bytes_per_second(mut self, bytes: u32) -> Self {
        self.bytes = Some(bytes);
        self
    }

    /// Peers whose replies are neither limited nor counted: those `exempt`
    /// vouches for (the same hook as
    /// [`AmplificationGuardLayer::validated_by`](crate::AmplificationGuardLayer::validated_by)).
    ///
    /// # Example
    ///
    /// ```
    /// use std::net::SocketAddr;
    /// use abyss_middleware::ReplyBudget;
    ///
    /// let budget = ReplyBudget::builder()
    ///     .replies_per_second(1)
    ///     .exempt(|peer: SocketAddr| peer.ip().is_loopback())
    ///     .build()?;
    /// let local = "127.0.0.1:5000".parse().unwrap();
    /// assert!((0..100).all(|_| budget.spend(local, 64)));
    /// # Ok::<(), abyss_middleware::RateLimitError>(())
    /// ```
    pub fn exempt(mut self, exempt: impl Validate) -> Self {
        self.exempt = Some(Box::new(exempt));
        self
    }

    /// Checks the options. Fails, naming the field, when neither budget is
    /// set or one is zero.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::ReplyBudget;
    ///
    /// let error = ReplyBudget::builder().bytes_per_second(0).build().unwrap_err();
    /// assert_eq!(error.field, "bytes_per_second");
    /// ```
    pub fn build(self) -> Result<ReplyBudget, RateLimitError> {
        if self.replies.is_none() && self.bytes.is_none() {
            return Err(RateLimitError::new(
                "replies_per_second",
                "set replies_per_second, bytes_per_second or both",
            ));
        }
        let check = |field: &'static str, per_second: Option<u32>| match per_second {
            Some(0) => Err(RateLimitError::new(field, "must be at least 1")),
            _ => Ok(per_second),
        };
        let replies = check("replies_per_second", self.replies)?;
        Ok(ReplyBudget {
            shared: Arc::new(Shared {
                reply_cost: replies.map(|n| cost(1, n)),
                replies,
                bytes: check("bytes_per_second", self.bytes)?,
                tats: Mutex::new(Tats::default()),
                base: tokio::time::Instant::now(),
                exempt: self.exempt,
                sent: AtomicU64::new(0),
                exempted: AtomicU64::new(0),
                over_budget: AtomicU64::new(0),
            }),
        })
    }
}

impl Shared {
    /// Whether a reply of `bytes` fits both budgets; if so, spends it.
    fn fits(&self, bytes: usize) -> bool {
        let now = u64::try_from(
            tokio::time::Instant::now()
                .saturating_duration_since(self.base)
                .as_nanos(),
        )
        .unwrap_or(u64::MAX);
        // What these bytes take: a share of a second.
        let reply_cost = self.reply_cost;
        let bytes_cost = self
            .bytes
            .map(|n| cost(u64::try_from(bytes).unwrap_or(u64::MAX), n));
        let mut tats = self.tats.lock().unwrap_or_else(|e| e.into_inner());
        // A budget is spent up to its TAT; a reply fits if spending it
        // leaves the budget at most one second ahead of now.
        let after =
            |tat: u64, cost: Option<u64>| cost.map(|cost| tat.max(now).saturating_add(cost));
        let replies = after(tats.replies, reply_cost);
        let bytes = after(tats.bytes, bytes_cost);
        let within = |after: Option<u64>| after.is_none_or(|t| t <= now.saturating_add(SECOND));
        if !(within(replies) && within(bytes)) {
            return false;
        }
        if let Some(t) = replies {
            tats.replies = t;
        }
        if let Some(t) = bytes {
            tats.bytes = t;
        }
        true
    }
}

/// Applies a [`ReplyBudget`]; from [`ReplyBudget::layer`].
///
/// # Example
///
/// ```
/// use abyss_middleware::ReplyBudget;
/// use tower::Layer;
///
/// let budget = ReplyBudget::builder().replies_per_second(100).build()?;
/// let service = budget.layer().layer(tower::service_fn(|_: ()| async {
///     Ok::<_, std::convert::Infallible>(())
/// }));
/// # let _ = service;
/// # Ok::<(), abyss_middleware::RateLimitError>(())
/// ```
#[derive(Debug, Clone)]
pub struct ReplyBudgetLayer {
    budget: ReplyBudget,
}

impl<S> Layer<S> for ReplyBudgetLayer {
    type Service = ReplyBudgetService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ReplyBudgetService {
            inner,
            budget: self.budget.clone(),
        }
    }
}

/// A service whose replies spend a [`ReplyBudget`]; from
/// [`ReplyBudgetLayer`].
///
/// # Example
///
/// ```
/// use abyss_middleware::ReplyBudget;
/// use abyss_middleware::budget::ReplyBudgetService;
/// use tower::Layer;
///
/// let budget = ReplyBudget::builder().replies_per_second(100).build()?;
/// let inner = tower::service_fn(|_: ()| async { Ok::<_, std::convert::Infallible>(()) });
/// let service: ReplyBudgetService<_> = budget.layer().layer(inner);
/// # let _ = service;
/// # Ok::<(), abyss_middleware::RateLimitError>(())
/// ```
#[derive(Debug, Clone)]
pub struct ReplyBudgetService<S> {
    inner: S,
    budget: ReplyBudget,
}

impl<S, R> Service<R> for ReplyBudgetService<S>
where
    S: Service<R>,
    S::Response: IntoReply,
    S::Error: Into<BoxError>,
    R: Datagram,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: R) -> Self::Future {
        let peer = request.peer();
        ResponseFuture::new(
            self.inner.call(request),
            ReplyRule::Budget(self.budget.clone()),
            peer,
        )
    }
}

/// Response future of [`ReplyBudgetService`]: the inner service's
/// response, or [`DropReason::OverBudget`](crate::DropReason::OverBudget)'s error when the reply is
/// over the budget.
pub use crate::future::ReplyFuture as ResponseFuture;
