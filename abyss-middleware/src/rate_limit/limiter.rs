use std::fmt;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use governor::middleware::NoOpMiddleware;

use super::PeerRateLimitLayer;
use super::quota::{RateLimitError, RateQuota};
use super::table::{SharedTable, Table, TableClock};

type Governor<K> = governor::RateLimiter<K, SharedTable<K>, TableClock, NoOpMiddleware<Duration>>;

/// A GCRA limiter for one quota, behind a trait object so that the types
/// holding it need no bounds on `K`.
pub(super) trait Check<K>: Send + Sync {
    /// Counts one datagram under `key`; whether it may pass.
    fn check(&self, key: &K) -> bool;
}

impl<K: Hash + Eq + Clone + Send + Sync> Check<K> for Governor<K> {
    fn check(&self, key: &K) -> bool {
        self.check_key(key).is_ok()
    }
}

pub(super) type Checker<K> = Arc<dyn Check<K>>;

pub(crate) type KeyFn<K> = dyn Fn(SocketAddr) -> K + Send + Sync;

/// The default for [`PeerRateLimiterBuilder::max_tracked_peers`].
///
/// # Example
///
/// ```
/// use abyss_middleware::rate_limit::DEFAULT_MAX_TRACKED_PEERS;
///
/// assert_eq!(DEFAULT_MAX_TRACKED_PEERS, 65_536);
/// ```
pub const DEFAULT_MAX_TRACKED_PEERS: usize = 65_536;

/// Shared per-peer rate-limit state; see the [module docs](super).
///
/// Cheap to clone: clones share the table, the quota and the counters.
///
/// # Example
///
/// ```
/// use std::net::SocketAddr;
/// use abyss_middleware::{PeerRateLimiter, RateQuota};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let limiter = PeerRateLimiter::new(RateQuota::per_second(2)).unwrap();
/// let peer: SocketAddr = "192.0.2.1:5000".parse().unwrap();
/// assert!(limiter.check(peer));
/// assert!(limiter.check(peer));
/// assert!(!limiter.check(peer), "a burst of 2, then one every 500 ms");
///
/// // The original's update_config: the new quota applies at once.
/// limiter.set_quota(RateQuota::per_second(100)).unwrap();
/// assert_eq!(limiter.stats().limited, 1);
/// # }
/// ```
pub struct PeerRateLimiter<K = IpAddr> {
    pub(super) shared: Arc<Shared<K>>,
}

pub(super) struct Shared<K> {
    table: Arc<Table<K>>,
    base: tokio::time::Instant,
    current: RwLock<(RateQuota, Checker<K>)>,
    generation: AtomicU64,
    pub(super) key: Arc<KeyFn<K>>,
}

impl<K> Clone for PeerRateLimiter<K> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<K> fmt::Debug for PeerRateLimiter<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerRateLimiter")
            .field("quota", &self.quota())
            .finish_non_exhaustive()
    }
}

/// Counters of a [`PeerRateLimiter`].
///
/// # Example
///
/// ```
/// use abyss_middleware::{PeerRateLimiter, RateQuota};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let limiter = PeerRateLimiter::new(RateQuota::per_second(1)).unwrap();
/// let peer = "192.0.2.1:5000".parse().unwrap();
/// assert!(limiter.check(peer));
/// assert!(!limiter.check(peer));
/// let stats = limiter.stats();
/// assert_eq!((stats.tracked_peers, stats.allowed, stats.limited), (1, 1, 1));
/// # }
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RateLimitStats {
    /// Keys in the table now (at most `max_tracked_peers`).
    pub tracked_peers: usize,
    /// Datagrams let through.
    pub allowed: u64,
    /// Datagrams refused.
    pub limited: u64,
    /// Idle keys dropped from the table.
    pub evicted: u64,
}

impl PeerRateLimiter<IpAddr> {
    /// A limiter with `quota`, keyed by peer IP (IPv4 /32, IPv6 /64),
    /// tracking at most 65 536 peers.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::{PeerRateLimiter, RateQuota};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), abyss_middleware::RateLimitError> {
    /// let limiter = PeerRateLimiter::new(RateQuota::per_second(100))?;
    /// assert_eq!(limiter.quota(), RateQuota::per_second(100));
    /// assert!(PeerRateLimiter::new(RateQuota::per_second(0)).is_err());
    /// # Ok(())
    /// # }
    /// ```
    pub fn new(quota: RateQuota) -> Result<Self, RateLimitError> {
        Self::builder(quota).build()
    }

    /// A builder for the options.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::{PeerRateLimiter, RateQuota};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let limiter = PeerRateLimiter::builder(RateQuota::per_second(10))
    ///     .max_tracked_peers(1_000)
    ///     .build()
    ///     .unwrap();
    /// # let _ = limiter;
    /// # }
    /// ```
    pub fn builder(quota: RateQuota) -> PeerRateLimiterBuilder<IpAddr> {
        PeerRateLimiterBuilder {
            quota,
            max_tracked_peers: DEFAULT_MAX_TRACKED_PEERS,
            prefixes: (32, 64),
            key: prefix_key(32, 64),
        }
    }
}

impl<K> PeerRateLimiter<K> {
    /// The quota in force.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::{PeerRateLimiter, RateQuota};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let limiter = PeerRateLimiter::new(RateQuota::per_second(10)).unwrap();
    /// limiter.set_quota(RateQuota::per_second(20)).unwrap();
    /// assert_eq!(limiter.quota().max(), 20);
    /// # }
    /// ```
    pub fn quota(&self) -> RateQuota {
        self.shared
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .0
    }
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> PeerRateLimiter<K> {
    /// The layer that applies this limiter. Every service it wraps shares
    /// this limiter's table and quota.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::{PeerRateLimiter, RateQuota};
    /// use tower::ServiceBuilder;
    /// # #[derive(Debug)] struct Req;
    /// # impl abyss_middleware::Datagram for Req {
    /// #     fn peer(&self) -> std::net::SocketAddr { ([192, 0, 2, 1], 1).into() }
    /// #     fn local(&self) -> std::net::SocketAddr { ([192, 0, 2, 2], 2).into() }
    /// #     fn payload_len(&self) -> usize { 0 }
    /// # }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let limiter = PeerRateLimiter::new(RateQuota::per_second(50)).unwrap();
    /// let service = ServiceBuilder::new()
    ///     .layer(limiter.layer())
    ///     .service_fn(|_: Req| async { Ok::<_, std::convert::Infallible>(()) });
    /// # let _ = service;
    /// // Keep `limiter` to change the quota and read the counters while serving.
    /// assert_eq!(limiter.stats().allowed, 0);
    /// # }
    /// ```
    pub fn layer(&self) -> PeerRateLimitLayer<K> {
        PeerRateLimitLayer::from_limiter(self.clone())
    }

    /// Counts one datagram from `peer` and says whether it may pass.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::{PeerRateLimiter, RateQuota};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let limiter = PeerRateLimiter::new(RateQuota::per_second(1)).unwrap();
    /// // Keyed by /64: two addresses of one IPv6 subnet share an allowance.
    /// assert!(limiter.check("[2001:db8::1]:1000".parse().unwrap()));
    /// assert!(!limiter.check("[2001:db8::2]:1000".parse().unwrap()));
    /// assert!(limiter.check("[2001:db8:0:1::1]:1000".parse().unwrap()));
    /// # }
    /// ```
    pub fn check(&self, peer: SocketAddr) -> bool {
        let key = (self.shared.key)(peer);
        self.governor().1.check(&key)
    }

    /// Replaces the quota while serving. Every peer starts afresh under the
    /// new quota, with a full burst: a debt counted in the old quota's
    /// intervals would mean something else in the new one.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::{PeerRateLimiter, RateQuota};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let limiter = PeerRateLimiter::new(RateQuota::per_second(1)).unwrap();
    /// let peer = "192.0.2.1:5000".parse().unwrap();
    /// assert!(limiter.check(peer));
    /// assert!(!limiter.check(peer));
    ///
    /// limiter.set_quota(RateQuota::per_second(5)).unwrap();
    /// assert!(limiter.check(peer), "every peer starts afresh");
    /// assert_eq!(limiter.set_quota(RateQuota::per_second(0)).unwrap_err().field, "max");
    /// assert_eq!(limiter.quota().max(), 5, "a refused quota changes nothing");
    /// # }
    /// ```
    pub fn set_quota(&self, quota: RateQuota) -> Result<(), RateLimitError> {
        let governor: Checker<K> = Arc::new(self.shared.build_governor(quota)?);
        let mut current = self
            .shared
            .current
            .write()
            .unwrap_or_else(|e| e.into_inner());
        *current = (quota, governor);
        self.shared.table.forget_all();
        self.shared.generation.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// The counters.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::{PeerRateLimiter, RateQuota};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let limiter = PeerRateLimiter::new(RateQuota::per_second(100)).unwrap();
    /// limiter.check("192.0.2.1:1".parse().unwrap());
    /// limiter.check("192.0.2.2:1".parse().unwrap());
    /// assert_eq!(limiter.stats().tracked_peers, 2);
    /// # }
    /// ```
    pub fn stats(&self) -> RateLimitStats {
        let totals = self.shared.table.totals();
        RateLimitStats {
            tracked_peers: totals.tracked,
            allowed: totals.allowed,
            limited: totals.limited,
            evicted: totals.evicted,
        }
    }

    /// Drops every peer whose allowance has fully refilled: a scan of the
    /// whole table, one shard at a time. A full table gives idle peers'
    /// places to new ones by itself, without a scan; call this to give
    /// memory back sooner.
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use abyss_middleware::{PeerRateLimiter, RateQuota};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let limiter = PeerRateLimiter::new(RateQuota::per_second(10)).unwrap();
    /// limiter.check("192.0.2.1:1".parse().unwrap());
    /// assert_eq!(limiter.stats().tracked_peers, 1);
    ///
    /// tokio::time::advance(Duration::from_secs(1)).await; // its allowance refilled
    /// limiter.evict_idle();
    /// assert_eq!(limiter.stats().tracked_peers, 0);
    /// assert_eq!(limiter.stats().evicted, 1);
    /// # }
    /// ```
    pub fn evict_idle(&self) {
        self.shared.table.evict_idle();
    }

    /// The current limiter and its generation, for services to cache.
    pub(super) fn governor(&self) -> (u64, Checker<K>) {
        let current = self
            .shared
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner());
        (
            self.shared.generation.load(Ordering::Acquire),
            current.1.clone(),
        )
    }

    pub(super) fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::Acquire)
    }
}

impl<K: Hash + Eq + Clone + Send + Sync> Shared<K> {
    fn build_governor(&self, quota: RateQuota) -> Result<Governor<K>, RateLimitError> {
        let quota = quota.to_governor()?;
        Ok(Governor::new(
            quota,
            SharedTable(self.table.clone()),
            TableClock::new(self.base),
        ))
    }
}

/// Options of a [`PeerRateLimiter`].
///
/// # Example
///
/// ```
/// use abyss_middleware::{PeerRateLimiter, RateQuota};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// // Key by the whole /24 or /48, remember at most 10 000 of them.
/// let limiter = PeerRateLimiter::builder(RateQuota::per_second(50))
///     .prefixes(24, 48)
///     .max_tracked_peers(10_000)
///     .build()
///     .unwrap();
/// assert!(limiter.check("198.51.100.7:53".parse().unwrap()));
///
/// // Or by port, for a test bench where every peer is 127.0.0.1.
/// let by_port = PeerRateLimiter::builder(RateQuota::per_second(50))
///     .with_key(|peer| peer.port())
///     .build()
///     .unwrap();
/// # let _ = by_port;
/// # }
/// ```
pub struct PeerRateLimiterBuilder<K> {
    quota: RateQuota,
    max_tracked_peers: usize,
    prefixes: (u8, u8),
    key: Arc<KeyFn<K>>,
}

impl<K> fmt::Debug for PeerRateLimiterBuilder<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerRateLimiterBuilder")
            .field("quota", &self.quota)
            .field("max_tracked_peers", &self.max_tracked_peers)
            .field("prefixes", &self.prefixes)
            .finish()
    }
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> PeerRateLimiterBuilder<K> {
    /// How many keys the table holds at most (default 65 536).
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::{PeerRateLimiter, RateQuota};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let small = PeerRateLimiter::builder(RateQuota::per_second(10)).max_tracked_peers(1024).build();
    /// assert!(small.is_ok());
    /// let none = PeerRateLimiter::builder(RateQuota::per_second(10)).max_tracked_peers(0).build();
    /// assert_eq!(none.unwrap_err().field, "max_tracked_peers");
    /// # }
    /// ```
    pub fn max_tracked_peers(mut self, peers: usize) -> Self {
        self.max_tracked_peers = peers;
        self
    }

    /// Builds the limiter, checking every option.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::{PeerRateLimiter, RateQuota};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let error = PeerRateLimiter::builder(RateQuota::per_second(10))
    ///     .prefixes(33, 64)
    ///     .build()
    ///     .unwrap_err();
    /// assert_eq!(error.field, "prefix_v4");
    /// # }
    /// ```
    pub fn build(self) -> Result<PeerRateLimiter<K>, RateLimitError> {
        if self.max_tracked_peers == 0 {
            return Err(RateLimitError::new(
                "max_tracked_peers",
                "must be at least 1",
            ));
        }
        let (v4, v6) = self.prefixes;
        if v4 > 32 {
            return Err(RateLimitError::new("prefix_v4", "must be at most 32"));
        }
        if v6 > 128 {
            return Err(RateLimitError::new("prefix_v6", "must be at most 128"));
        }
        let key = self.key;
        let base = tokio::time::Instant::now();
        let table = Arc::new(Table::new(self.max_tracked_peers, TableClock::new(base)));
        let quota = self.quota.to_governor()?;
        let governor: Checker<K> = Arc::new(Governor::new(
            quota,
            SharedTable(table.clone()),
            TableClock::new(base),
        ));
        Ok(PeerRateLimiter {
            shared: Arc::new(Shared {
                table,
                base,
                current: RwLock::new((self.quota, governor)),
                generation: AtomicU64::new(0),
                key,
            }),
        })
    }
}

impl PeerRateLimiterBuilder<IpAddr> {
    /// Keys peers by their address cut to `v4` bits (0 to 32, default 32)
    /// or `v6` bits (0 to 128, default 64).
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::{PeerRateLimiter, RateQuota};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// // A whole /24 shares one allowance.
    /// let limiter = PeerRateLimiter::builder(RateQuota::per_second(1))
    ///     .prefixes(24, 48)
    ///     .build()
    ///     .unwrap();
    /// assert!(limiter.check("198.51.100.1:1".parse().unwrap()));
    /// assert!(!limiter.check("198.51.100.200:1".parse().unwrap()));
    /// # }
    /// ```
    pub fn prefixes(mut self, v4: u8, v6: u8) -> Self {
        self.prefixes = (v4, v6);
        self.key = prefix_key(v4, v6);
        self
    }

    /// Keys peers by `key(peer_address)` instead of by IP prefix.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::{PeerRateLimiter, RateQuota};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// // One allowance per address and port.
    /// let limiter = PeerRateLimiter::builder(RateQuota::per_second(1))
    ///     .with_key(|peer| peer)
    ///     .build()
    ///     .unwrap();
    /// assert!(limiter.check("127.0.0.1:1000".parse().unwrap()));
    /// assert!(limiter.check("127.0.0.1:1001".parse().unwrap()));
    /// assert!(!limiter.check("127.0.0.1:1000".parse().unwrap()));
    /// # }
    /// ```
    pub fn with_key<K2, F>(self, key: F) -> PeerRateLimiterBuilder<K2>
    where
        F: Fn(SocketAddr) -> K2 + Send + Sync + 'static,
    {
        PeerRateLimiterBuilder {
            quota: self.quota,
            max_tracked_peers: self.max_tracked_peers,
            prefixes: self.prefixes,
            key: Arc::new(key),
        }
    }
}

/// Keys a peer by its address with all but the first `v4` / `v6` bits
/// cleared. IPv4-mapped IPv6 peers (on dual-stack sockets) are keyed as IPv4.
pub(crate) fn prefix_key(v4: u8, v6: u8) -> Arc<KeyFn<IpAddr>> {
    let v4_mask = u32::MAX
        .checked_shl(32 - u32::from(v4.min(32)))
        .unwrap_or(0);
    let v6_mask = u128::MAX
        .checked_shl(128 - u32::from(v6.min(128)))
        .unwrap_or(0);
    Arc::new(move |peer: SocketAddr| match peer.ip() {
        IpAddr::V4(ip) => IpAddr::V4(Ipv4Addr::from(u32::from(ip) & v4_mask)),
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(mapped) => IpAddr::V4(Ipv4Addr::from(u32::from(mapped) & v4_mask)),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(ip) & v6_mask)),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(v4: u8, v6: u8, peer: &str) -> IpAddr {
        prefix_key(v4, v6)(peer.parse().unwrap())
    }

    #[test]
    fn prefix_keys_clear_the_host_bits() {
        assert_eq!(
            key(32, 64, "192.0.2.77:1"),
            "192.0.2.77".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            key(24, 64, "192.0.2.77:1"),
            "192.0.2.0".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            key(0, 0, "192.0.2.77:1"),
            "0.0.0.0".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            key(32, 64, "[2001:db8:1:2:aaaa:bbbb:cccc:dddd]:1"),
            "2001:db8:1:2::".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            key(32, 128, "[2001:db8::1]:1"),
            "2001:db8::1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            key(32, 64, "[::ffff:192.0.2.1]:1"),
            "192.0.2.1".parse::<IpAddr>().unwrap()
        );
    }
}
