use std::any::Any;
use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::fmt;
use std::future::Future;
use std::hash::BuildHasher;
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use tokio::sync::{Notify, mpsc, oneshot, watch};

#[cfg(doc)]
use super::Step;
use super::step::Next;
use super::{Session, SessionContext, SessionService};
use crate::middleware::DropReason;
use crate::{BoxError, Error, Request};

const TARGET: &str = "abyss::session";

/// The defaults: enough sessions for a busy service while bounding memory
/// (each is a task and a queue), a queue that absorbs a burst from one peer,
/// and an idle timeout that outlives a client's retry interval.
const DEFAULT_MAX_SESSIONS: usize = 16_384;
const DEFAULT_QUEUE_SIZE: usize = 64;
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Sessions one source (an IPv4 address, an IPv6 /64) may hold by default:
/// this share of `max_sessions`, so that one host cannot take the table.
const DEFAULT_SOURCE_SHARE: usize = 16;
/// Shards of the session table: datagrams of different peers rarely wait
/// for one another.
const SHARDS: usize = 64;

type Factory<S> = dyn Fn(SocketAddr) -> S + Send + Sync;
type KeyFn<K> = dyn Fn(&Request) -> K + Send + Sync;

/// A datagram handed to a session, with where its outcome goes.
pub(super) struct Job {
    request: Request,
    outcome: oneshot::Sender<Outcome>,
}

/// What became of a datagram a session handled.
pub(super) enum Outcome {
    Reply(Option<Bytes>),
    Failed(BoxError),
    Panicked(Box<dyn Any + Send>),
}

struct Entry {
    id: u64,
    queue: mpsc::Sender<Job>,
    /// The source whose share this session counts in.
    source: IpAddr,
}

/// The source a peer's sessions count against: its IPv4 address, or the
/// /64 of its IPv6 address (one host often holds a whole /64).
fn source_of(peer: SocketAddr) -> IpAddr {
    match peer.ip().to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & (u128::MAX << 64);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

/// Why a new session was not started.
enum Refusal {
    /// `max_sessions` are live.
    Full,
    /// The source holds its share.
    SourceFull,
}

/// The live sessions of one [`SessionService`], and their counters.
///
/// Cheap to clone: clones share the sessions. See the [module
/// docs](super).
///
/// # Example
///
/// ```
/// use abyss::session::{Session, Sessions, Step};
/// use abyss::Request;
///
/// struct Counter(u64);
///
/// impl Session for Counter {
///     async fn handle(&mut self, _request: Request) -> Step {
///         self.0 += 1;
///         Step::keep().reply(self.0.to_string())
///     }
/// }
/// use abyss::Server;
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let sessions = Sessions::builder(|_peer| Counter(0)).build()?;
/// let handle = Server::bind("127.0.0.1:0")
///     .on_shutdown({
///         let sessions = sessions.clone();
///         move || sessions.shutdown()
///     })
///     .serve(sessions.service())
///     .await?;
///
/// let timeout = std::time::Duration::from_secs(5);
/// let alice = abyss::client::UdpClient::connect(handle.local_addr()).await?;
/// let bob = abyss::client::UdpClient::connect(handle.local_addr()).await?;
/// assert_eq!(alice.request(b"a", timeout).await?, "1");
/// assert_eq!(alice.request(b"a", timeout).await?, "2");
/// assert_eq!(bob.request(b"b", timeout).await?, "1", "a session of his own");
/// assert_eq!(sessions.stats().live, 2);
///
/// handle.shutdown().await;
/// assert_eq!(sessions.stats().shut_down, 2);
/// # Ok(())
/// # }
/// ```
pub struct Sessions<S, K = SocketAddr> {
    registry: Arc<Registry<S, K>>,
}

impl<S, K> Clone for Sessions<S, K> {
    fn clone(&self) -> Self {
        Self {
            registry: self.registry.clone(),
        }
    }
}

impl<S, K> fmt::Debug for Sessions<S, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sessions")
            .field("max_sessions", &self.registry.max_sessions)
            .field("queue_size", &self.registry.queue_size)
            .field("idle_timeout", &self.registry.idle_timeout)
            .finish_non_exhaustive()
    }
}

pub(super) struct Registry<S, K> {
    factory: Box<Factory<S>>,
    key: Box<KeyFn<K>>,
    max_sessions: usize,
    queue_size: usize,
    idle_timeout: Duration,
    max_per_source: usize,
    /// The sessions, by key, in shards chosen by the key's hash.
    live: Box<[Mutex<HashMap<K, Entry>>]>,
    hasher: RandomState,
    /// Live sessions in all shards.
    count: AtomicUsize,
    /// Sessions per source, in shards chosen by the source's hash.
    sources: Box<[Mutex<HashMap<IpAddr, usize>>]>,
    next_id: AtomicU64,
    shutdown: watch::Sender<bool>,
    running: AtomicUsize,
    ended: Notify,
    counters: Counters,
    #[cfg(feature = "metrics")]
    metrics: crate::server::metrics::Sessions,
}

/// What a table counted is kept in its label's series when it goes.
#[cfg(feature = "metrics")]
impl<S, K> Drop for Registry<S, K> {
    fn drop(&mut self) {
        self.metrics.retire(self.stats());
    }
}

#[cfg(feature = "metrics")]
impl<S, K> crate::server::metrics::Source<SessionStats> for Registry<S, K> {
    fn add_to(&self, totals: &mut SessionStats) {
        crate::server::metrics::Totals::add(totals, &self.stats());
    }
}

#[derive(Default)]
struct Counters {
    created: AtomicU64,
    refused: AtomicU64,
    refused_per_source: AtomicU64,
    queue_full: AtomicU64,
    closed: AtomicU64,
    timed_out: AtomicU64,
    failed: AtomicU64,
    panicked: AtomicU64,
    shut_down: AtomicU64,
}

/// Counters of a [`Sessions`].
///
/// # Example
///
/// Driving the sessions' service by hand, without a server:
///
/// ```
/// use std::future::poll_fn;
/// use abyss::session::{Session, Sessions, Step};
/// use abyss::{Bytes, Request, SendHandle, Service};
///
/// struct Counter(u64);
///
/// impl Session for Counter {
///     async fn handle(&mut self, _request: Request) -> Step {
///         self.0 += 1;
///         Step::keep().reply(self.0.to_string())
///     }
/// }
///
/// fn datagram(peer: &str) -> Request {
///     let local = "192.0.2.53:53".parse().unwrap();
///     Request::new(peer.parse().unwrap(), local, Bytes::from_static(b"hi"), SendHandle::detached())
/// }
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), abyss::BoxError> {
/// let sessions = Sessions::builder(|_peer| Counter(0)).max_sessions(1).build()?;
/// let mut service = sessions.service();
///
/// poll_fn(|cx| service.poll_ready(cx)).await?;
/// let reply = service.call(datagram("192.0.2.1:5000")).await?;
/// assert_eq!(reply.as_deref(), Some(&b"1"[..]));
///
/// // The one session allowed is taken: a second peer is refused.
/// poll_fn(|cx| service.poll_ready(cx)).await?;
/// assert!(service.call(datagram("192.0.2.2:5000")).await.is_err());
///
/// let stats = sessions.stats();
/// assert_eq!((stats.live, stats.created, stats.refused), (1, 1, 1));
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionStats {
    /// Sessions alive now.
    pub live: usize,
    /// Sessions started.
    pub created: u64,
    /// Datagrams from new peers dropped because `max_sessions` were live,
    /// or because their source held its share
    /// ([`SessionsBuilder::max_sessions_per_source`]).
    pub refused: u64,
    /// Of `refused`, those refused because their source held its share.
    pub refused_per_source: u64,
    /// Datagrams dropped because their session's queue was full.
    pub queue_full: u64,
    /// Sessions ended by [`Step::close`] (from a datagram or an idle
    /// timeout).
    pub closed: u64,
    /// Idle timeouts that fired ([`Session::on_idle`] calls).
    pub timed_out: u64,
    /// Sessions ended by [`Step::error`].
    pub failed: u64,
    /// Sessions ended by a panic.
    pub panicked: u64,
    /// Sessions ended by [`Sessions::shutdown`].
    pub shut_down: u64,
}

/// Options of a [`Sessions`]; from [`Sessions::builder`].
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use abyss::session::{Session, Sessions, Step};
/// use abyss::Request;
///
/// struct Counter(u64);
///
/// impl Session for Counter {
///     async fn handle(&mut self, _request: Request) -> Step {
///         self.0 += 1;
///         Step::keep().reply(self.0.to_string())
///     }
/// }
///
/// let sessions = Sessions::builder(|_peer| Counter(0))
///     .max_sessions(1024)
///     .queue_size(16)
///     .idle_timeout(Duration::from_secs(300))
///     .build()?;
/// # let _ = sessions;
/// # Ok::<(), abyss::Error>(())
/// ```
pub struct SessionsBuilder<S, K = SocketAddr> {
    factory: Box<Factory<S>>,
    key: Box<KeyFn<K>>,
    max_sessions: usize,
    max_per_source: Option<usize>,
    queue_size: usize,
    idle_timeout: Duration,
    name: Option<String>,
}

impl<S, K> fmt::Debug for SessionsBuilder<S, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionsBuilder")
            .field("max_sessions", &self.max_sessions)
            .field("queue_size", &self.queue_size)
            .field("idle_timeout", &self.idle_timeout)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl<S: Session> Sessions<S, SocketAddr> {
    /// Sessions whose state `factory` creates for each new peer (the
    /// original's `init`), keyed by peer address. The factory runs on the
    /// new session's own task, under no lock.
    ///
    /// # Example
    ///
    /// ```
    /// use std::net::SocketAddr;
    /// use abyss::session::{Session, Sessions, Step};
    /// use abyss::Request;
    ///
    /// struct Greeter {
    ///     peer: SocketAddr,
    /// }
    ///
    /// impl Session for Greeter {
    ///     async fn handle(&mut self, _request: Request) -> Step {
    ///         Step::keep().reply(format!("hello {}", self.peer))
    ///     }
    /// }
    ///
    /// let sessions = Sessions::builder(|peer| Greeter { peer }).build()?;
    /// # let _ = sessions;
    /// # Ok::<(), abyss::Error>(())
    /// ```
    pub fn builder(
        factory: impl Fn(SocketAddr) -> S + Send + Sync + 'static,
    ) -> SessionsBuilder<S, SocketAddr> {
        SessionsBuilder {
            factory: Box::new(factory),
            key: Box::new(Request::peer),
            max_sessions: DEFAULT_MAX_SESSIONS,
            max_per_source: None,
            queue_size: DEFAULT_QUEUE_SIZE,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            name: None,
        }
    }
}

impl<S: Session, K> SessionsBuilder<S, K> {
    /// Live sessions at most (default 16 384: enough for a busy service,
    /// while bounding the memory and tasks they hold).
    ///
    /// # Example
    ///
    /// ```
    /// use abyss::session::{Session, Sessions, Step};
    /// use abyss::Request;
    ///
    /// struct Counter(u64);
    ///
    /// impl Session for Counter {
    ///     async fn handle(&mut self, _request: Request) -> Step {
    ///         self.0 += 1;
    ///         Step::keep().reply(self.0.to_string())
    ///     }
    /// }
    ///
    /// let sessions = Sessions::builder(|_peer| Counter(0)).max_sessions(100).build()?;
    /// # let _ = sessions;
    /// let error = Sessions::builder(|_peer| Counter(0)).max_sessions(0).build().unwrap_err();
    /// assert_eq!(error.field(), Some("max_sessions"));
    /// # Ok::<(), abyss::Error>(())
    /// ```
    pub fn max_sessions(mut self, sessions: usize) -> Self {
        self.max_sessions = sessions;
        self
    }

    /// Sessions one source may hold at most: an IPv4 address, or an IPv6
    /// /64 (default: a sixteenth of [`max_sessions`](Self::max_sessions),
    /// at least 1). Without it, one host sending from thousands of source
    /// ports could take every session and lock new peers out until its
    /// sessions idle out; with it, a datagram that would start a session
    /// beyond its source's share is refused (counted in
    /// [`SessionStats::refused_per_source`]). Raise it for peers behind a
    /// large NAT.
    ///
    /// ```
    /// # use abyss::session::{Session, Sessions, Step};
    /// # struct Quiet;
    /// # impl Session for Quiet {
    /// #     async fn handle(&mut self, _request: abyss::Request) -> Step { Step::keep() }
    /// # }
    /// let sessions = Sessions::builder(|_peer| Quiet)
    ///     .max_sessions(10_000)
    ///     .max_sessions_per_source(100)
    ///     .build()?;
    /// # let _ = sessions;
    /// # Ok::<(), abyss::Error>(())
    /// ```
    pub fn max_sessions_per_source(mut self, sessions: usize) -> Self {
        self.max_per_source = Some(sessions);
        self
    }

    /// Datagrams each session queues at most while it is busy (default 64).
    ///
    /// # Example
    ///
    /// ```
    /// use abyss::session::{Session, Sessions, Step};
    /// use abyss::Request;
    ///
    /// struct Counter(u64);
    ///
    /// impl Session for Counter {
    ///     async fn handle(&mut self, _request: Request) -> Step {
    ///         self.0 += 1;
    ///         Step::keep().reply(self.0.to_string())
    ///     }
    /// }
    ///
    /// // A peer that sends faster than its session handles loses the excess.
    /// let sessions = Sessions::builder(|_peer| Counter(0)).queue_size(8).build()?;
    /// # let _ = sessions;
    /// # Ok::<(), abyss::Error>(())
    /// ```
    pub fn queue_size(mut self, datagrams: usize) -> Self {
        self.queue_size = datagrams;
        self
    }

    /// How long a session waits for a datagram before
    /// [`Session::on_idle`] (default 60 s: longer than clients wait between
    /// retries, short enough to free a departed peer's state within a
    /// minute).
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use abyss::session::{Session, Sessions, Step};
    /// use abyss::Request;
    ///
    /// struct Counter(u64);
    ///
    /// impl Session for Counter {
    ///     async fn handle(&mut self, _request: Request) -> Step {
    ///         self.0 += 1;
    ///         Step::keep().reply(self.0.to_string())
    ///     }
    /// }
    ///
    /// let sessions = Sessions::builder(|_peer| Counter(0))
    ///     .idle_timeout(Duration::from_secs(10))
    ///     .build()?;
    /// # let _ = sessions;
    /// # Ok::<(), abyss::Error>(())
    /// ```
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Which datagrams share a session: by default those from one peer
    /// address; `key` can group them otherwise (by IP only, by a protocol
    /// field).
    ///
    /// # Example
    ///
    /// ```
    /// use abyss::session::{Session, Sessions, Step};
    /// use abyss::Request;
    ///
    /// struct Counter(u64);
    ///
    /// impl Session for Counter {
    ///     async fn handle(&mut self, _request: Request) -> Step {
    ///         self.0 += 1;
    ///         Step::keep().reply(self.0.to_string())
    ///     }
    /// }
    ///
    /// // One session per host, whatever port each datagram comes from.
    /// let by_ip = Sessions::builder(|_peer| Counter(0))
    ///     .key(|request| request.peer().ip())
    ///     .build()?;
    /// # let _ = by_ip;
    /// # Ok::<(), abyss::Error>(())
    /// ```
    pub fn key<K2>(
        self,
        key: impl Fn(&Request) -> K2 + Send + Sync + 'static,
    ) -> SessionsBuilder<S, K2> {
        SessionsBuilder {
            factory: self.factory,
            key: Box::new(key),
            max_sessions: self.max_sessions,
            max_per_source: self.max_per_source,
            queue_size: self.queue_size,
            idle_timeout: self.idle_timeout,
            name: self.name,
        }
    }

    /// A name for this table in metrics (feature `metrics`): the value of
    /// the `sessions` label of its series. Default: the table's number in
    /// the process, `1` for the first one built. Tables built with the same
    /// name share their series, which add up.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss::session::{Session, Sessions, Step};
    ///
    /// struct Quiet;
    ///
    /// impl Session for Quiet {
    ///     async fn handle(&mut self, _request: abyss::Request) -> Step {
    ///         Step::keep()
    ///     }
    /// }
    ///
    /// let sessions = Sessions::builder(|_peer| Quiet).name("game").build()?;
    /// # let _ = sessions;
    /// # Ok::<(), abyss::Error>(())
    /// ```
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Checks the options.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss::session::{Session, Sessions, Step};
    /// use abyss::Request;
    ///
    /// struct Counter(u64);
    ///
    /// impl Session for Counter {
    ///     async fn handle(&mut self, _request: Request) -> Step {
    ///         self.0 += 1;
    ///         Step::keep().reply(self.0.to_string())
    ///     }
    /// }
    ///
    /// let error = Sessions::builder(|_peer| Counter(0))
    ///     .idle_timeout(std::time::Duration::ZERO)
    ///     .build()
    ///     .unwrap_err();
    /// assert_eq!(error.field(), Some("idle_timeout"));
    /// ```
    pub fn build(self) -> Result<Sessions<S, K>, Error> {
        if self.max_sessions == 0 {
            return Err(Error::config("max_sessions", "must be at least 1"));
        }
        if self.queue_size == 0 {
            return Err(Error::config("queue_size", "must be at least 1"));
        }
        if self.idle_timeout.is_zero() {
            return Err(Error::config("idle_timeout", "must be longer than zero"));
        }
        let max_per_source = match self.max_per_source {
            Some(0) => {
                return Err(Error::config(
                    "max_sessions_per_source",
                    "must be at least 1",
                ));
            }
            Some(n) => n,
            None => (self.max_sessions / DEFAULT_SOURCE_SHARE).max(1),
        };
        #[cfg(not(feature = "metrics"))]
        let _ = self.name;
        Ok(Sessions {
            registry: Arc::new(Registry {
                factory: self.factory,
                key: self.key,
                max_sessions: self.max_sessions,
                queue_size: self.queue_size,
                idle_timeout: self.idle_timeout,
                max_per_source,
                live: (0..SHARDS).map(|_| Mutex::default()).collect(),
                hasher: RandomState::new(),
                count: AtomicUsize::new(0),
                sources: (0..SHARDS).map(|_| Mutex::default()).collect(),
                next_id: AtomicU64::new(0),
                shutdown: watch::Sender::new(false),
                running: AtomicUsize::new(0),
                ended: Notify::new(),
                counters: Counters::default(),
                #[cfg(feature = "metrics")]
                metrics: crate::server::metrics::Sessions::new(self.name),
            }),
        })
    }
}

impl<S: Session, K: Hash + Eq + Clone + Send + Sync + 'static> Sessions<S, K> {
    /// The service that routes datagrams to sessions. Clones share the
    /// sessions.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss::session::{Session, Sessions, Step};
    /// use abyss::Request;
    ///
    /// struct Counter(u64);
    ///
    /// impl Session for Counter {
    ///     async fn handle(&mut self, _request: Request) -> Step {
    ///         self.0 += 1;
    ///         Step::keep().reply(self.0.to_string())
    ///     }
    /// }
    /// use abyss::Server;
    ///
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let sessions = Sessions::builder(|_peer| Counter(0)).build()?;
    /// // Behind the server's layers like any other service.
    /// let handle = Server::bind("127.0.0.1:0")
    ///     .rate_limit(abyss::middleware::RateQuota::per_second(100))
    ///     .serve(sessions.service())
    ///     .await?;
    /// # handle.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn service(&self) -> SessionService<S, K> {
        #[cfg(feature = "metrics")]
        self.registry.publish_metrics();
        SessionService::new(self.registry.clone())
    }

    /// Lets every session finish its queued datagrams, calls its
    /// [`Session::on_shutdown`], and waits until all have ended. Sessions
    /// started afterwards (by datagrams still in flight) end the same way
    /// once their queue is empty.
    ///
    /// The future holds its own handle on the sessions (it borrows nothing),
    /// so it fits [`Builder::on_shutdown`](crate::Builder::on_shutdown)
    /// as it is: `.on_shutdown(move || sessions.shutdown())`. Like any
    /// future, it does nothing until polled.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss::session::{Session, Sessions, Step};
    /// use abyss::Request;
    ///
    /// struct Counter(u64);
    ///
    /// impl Session for Counter {
    ///     async fn handle(&mut self, _request: Request) -> Step {
    ///         self.0 += 1;
    ///         Step::keep().reply(self.0.to_string())
    ///     }
    /// }
    /// use abyss::Server;
    ///
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let sessions = Sessions::builder(|_peer| Counter(0)).build()?;
    /// let handle = Server::bind("127.0.0.1:0")
    ///     // A graceful shutdown of the server ends every session too.
    ///     .on_shutdown({
    ///         let sessions = sessions.clone();
    ///         move || sessions.shutdown()
    ///     })
    ///     .serve(sessions.service())
    ///     .await?;
    /// abyss::client::send_recv(handle.local_addr(), b"hi", std::time::Duration::from_secs(5)).await?;
    ///
    /// handle.shutdown().await;
    /// assert_eq!(sessions.stats().live, 0);
    /// assert_eq!(sessions.stats().shut_down, 1);
    /// # Ok(())
    /// # }
    /// ```
    pub fn shutdown(&self) -> impl Future<Output = ()> + Send + 'static + use<S, K> {
        let registry = self.registry.clone();
        async move {
            registry.shutdown.send_replace(true);
            loop {
                let ended = registry.ended.notified();
                tokio::pin!(ended);
                ended.as_mut().enable();
                if registry.running.load(Ordering::Acquire) == 0 {
                    return;
                }
                ended.await;
            }
        }
    }
}

impl<S, K> Sessions<S, K> {
    /// The counters.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss::session::{Session, Sessions, Step};
    /// use abyss::Request;
    ///
    /// struct Counter(u64);
    ///
    /// impl Session for Counter {
    ///     async fn handle(&mut self, _request: Request) -> Step {
    ///         self.0 += 1;
    ///         Step::keep().reply(self.0.to_string())
    ///     }
    /// }
    ///
    /// let sessions = Sessions::builder(|_peer| Counter(0)).build()?;
    /// assert_eq!(sessions.stats(), Default::default(), "nothing yet");
    /// # Ok::<(), abyss::Error>(())
    /// ```
    pub fn stats(&self) -> SessionStats {
        self.registry.stats()
    }
}

impl<S, K> Registry<S, K> {
    fn stats(&self) -> SessionStats {
        let c = &self.counters;
        let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
        SessionStats {
            live: self.count.load(Ordering::Relaxed),
            created: load(&c.created),
            refused: load(&c.refused),
            refused_per_source: load(&c.refused_per_source),
            queue_full: load(&c.queue_full),
            closed: load(&c.closed),
            timed_out: load(&c.timed_out),
            failed: load(&c.failed),
            panicked: load(&c.panicked),
            shut_down: load(&c.shut_down),
        }
    }
}

impl<S, K: Hash> Registry<S, K> {
    /// The shard of the table that holds `key`.
    fn shard(&self, key: &K) -> MutexGuard<'_, HashMap<K, Entry>> {
        let index = self.hasher.hash_one(key) as usize % SHARDS;
        self.live[index].lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<S, K> Registry<S, K> {
    fn sources_of(&self, source: IpAddr) -> MutexGuard<'_, HashMap<IpAddr, usize>> {
        let index = self.hasher.hash_one(source) as usize % SHARDS;
        self.sources[index]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a place for a new session of `source`, if the table and the
    /// source's share have room.
    fn admit(&self, source: IpAddr) -> Result<(), Refusal> {
        let mut sources = self.sources_of(source);
        let held = sources.get(&source).copied().unwrap_or(0);
        if held >= self.max_per_source {
            return Err(Refusal::SourceFull);
        }
        // Only ever up to the cap: a refused admission never raises the
        // count, even for a moment, so it cannot refuse another below it.
        let max = self.max_sessions;
        self.count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .map_err(|_| Refusal::Full)?;
        *sources.entry(source).or_default() += 1;
        Ok(())
    }

    /// Gives back the place of an ended session of `source`.
    fn release(&self, source: IpAddr) {
        let mut sources = self.sources_of(source);
        if let Some(held) = sources.get_mut(&source) {
            *held -= 1;
            if *held == 0 {
                sources.remove(&source);
            }
        }
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How a session ended.
enum End {
    Closed,
    /// With the error when [`Session::on_error`] is still to be called.
    Failed(Option<BoxError>),
    Panicked,
    ShutDown,
}

impl<S: Session, K: Hash + Eq + Clone + Send + Sync + 'static> Registry<S, K> {
    /// Starts publishing this table's metrics if it has not yet (it needs
    /// a tokio runtime: `Sessions::service` may be called outside one, a
    /// session's start never is).
    #[cfg(feature = "metrics")]
    fn publish_metrics(self: &Arc<Self>) {
        self.metrics.publish(|| {
            let table: std::sync::Weak<Self> = Arc::downgrade(self);
            table
        });
    }

    /// Hands `request` to its session, starting one for a new peer. The
    /// error is the reason it was dropped. Only the key's shard is locked,
    /// and nothing slow runs under it: the session's state is made, and its
    /// task spawned, after the lock is released.
    pub(super) fn dispatch(
        self: &Arc<Self>,
        request: Request,
        outcome: oneshot::Sender<Outcome>,
    ) -> Result<(), DropReason> {
        let key = (self.key)(&request);
        let job = Job { request, outcome };
        let started = {
            let mut live = self.shard(&key);
            let job = match live.get(&key) {
                Some(entry) => match entry.queue.try_send(job) {
                    Ok(()) => return Ok(()),
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        self.counters.queue_full.fetch_add(1, Ordering::Relaxed);
                        return Err(DropReason::Overloaded);
                    }
                    // The session's task is gone without unregistering (its
                    // runtime was dropped): replace it.
                    Err(mpsc::error::TrySendError::Closed(job)) => {
                        if let Some(gone) = live.remove(&key) {
                            self.release(gone.source);
                        }
                        job
                    }
                },
                None => job,
            };
            let peer = job.request.peer();
            let source = source_of(peer);
            if let Err(refusal) = self.admit(source) {
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
                if matches!(refusal, Refusal::SourceFull) {
                    self.counters
                        .refused_per_source
                        .fetch_add(1, Ordering::Relaxed);
                }
                tracing::debug!(target: TARGET, %peer, per_source = matches!(refusal, Refusal::SourceFull), "session refused");
                return Err(DropReason::Overloaded);
            }
            self.register(&mut live, key.clone(), vec![job], source)
        };
        self.spawn(key, started);
        Ok(())
    }

    /// Registers a session with `jobs` already queued (at least one) in its
    /// shard, `live`, counting in `source`'s share (already taken).
    fn register(
        &self,
        live: &mut HashMap<K, Entry>,
        key: K,
        jobs: Vec<Job>,
        source: IpAddr,
    ) -> Started {
        let first = &jobs[0].request;
        let context = SessionContext {
            peer: first.peer(),
            sender: first.sender().clone(),
        };
        let (queue, receiver) = mpsc::channel(self.queue_size.max(jobs.len()));
        for job in jobs {
            // Room for all: the channel was sized for them.
            let _ = queue.try_send(job);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        live.insert(key, Entry { id, queue, source });
        Started {
            id,
            receiver,
            context,
            source,
        }
    }

    /// Starts the task of a registered session; its state is made there.
    fn spawn(self: &Arc<Self>, key: K, started: Started) {
        self.counters.created.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        self.publish_metrics();
        self.running.fetch_add(1, Ordering::AcqRel);
        tracing::debug!(target: TARGET, peer = %started.context.peer, id = started.id, "session start");
        tokio::spawn(self.clone().run(key, started));
    }

    async fn run(self: Arc<Self>, key: K, started: Started) {
        let Started {
            id,
            receiver: mut queue,
            mut context,
            source,
        } = started;
        let mut state = (self.factory)(context.peer);
        let mut shutdown = self.shutdown.subscribe();
        let mut idle_timeout = self.idle_timeout;
        let mut next_wait: Option<Duration> = None;
        // One timer for the session's life, reset at each turn.
        let idle = tokio::time::sleep(idle_timeout);
        tokio::pin!(idle);
        let end = loop {
            let wait = next_wait.take().unwrap_or(idle_timeout);
            idle.as_mut().reset(tokio::time::Instant::now() + wait);
            let step = tokio::select! {
                // Queued datagrams first: shutdown waits until the queue is empty.
                biased;
                job = queue.recv() => {
                    let Some(job) = job else { break End::ShutDown };
                    context.sender = job.request.sender().clone();
                    match AssertUnwindSafe(state.handle(job.request)).catch_unwind().await {
                        Ok(step) => match step.next {
                            Next::Error(error) => {
                                run_hook(state.on_error(&error, &context)).await;
                                let _ = job.outcome.send(Outcome::Failed(error));
                                break End::Failed(None);
                            }
                            next => {
                                let _ = job.outcome.send(Outcome::Reply(step.reply));
                                next
                            }
                        },
                        Err(panic) => {
                            let _ = job.outcome.send(Outcome::Panicked(panic));
                            break End::Panicked;
                        }
                    }
                }
                () = async { drop(shutdown.wait_for(|stopping| *stopping).await) } => break End::ShutDown,
                () = idle.as_mut() => {
                    self.counters.timed_out.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(target: TARGET, peer = %context.peer, id, "session idle");
                    match AssertUnwindSafe(state.on_idle(&context)).catch_unwind().await {
                        Ok(step) => {
                            if let Some(reply) = &step.reply {
                                let _ = context.sender.send_to(context.peer, reply).await;
                            }
                            match step.next {
                                Next::Error(error) => break End::Failed(Some(error)),
                                next => next,
                            }
                        }
                        Err(_) => break End::Panicked,
                    }
                }
            };
            match step {
                Next::Keep => {}
                Next::KeepFor(timeout) => next_wait = Some(timeout),
                Next::KeepWithIdleTimeout(timeout) => idle_timeout = timeout,
                Next::Close => break End::Closed,
                Next::Error(_) => unreachable!("errors end the loop above"),
            }
        };
        let counter = match &end {
            End::Closed => {
                run_hook(state.on_close(&context)).await;
                &self.counters.closed
            }
            End::Failed(error) => {
                if let Some(error) = error {
                    run_hook(state.on_error(error, &context)).await;
                }
                &self.counters.failed
            }
            End::Panicked => &self.counters.panicked,
            End::ShutDown => {
                run_hook(state.on_shutdown(&context)).await;
                &self.counters.shut_down
            }
        };
        counter.fetch_add(1, Ordering::Relaxed);
        drop(state);
        self.finish(key, id, source, queue);
        tracing::debug!(target: TARGET, peer = %context.peer, id, "session stop");
        self.running.fetch_sub(1, Ordering::AcqRel);
        self.ended.notify_waiters();
    }

    /// Unregisters a session. Datagrams that reached its queue after it
    /// decided to end go, in order, to a fresh session for the same key,
    /// which keeps its place in the source's share.
    fn finish(self: &Arc<Self>, key: K, id: u64, source: IpAddr, mut queue: mpsc::Receiver<Job>) {
        let started = {
            let mut live = self.shard(&key);
            if live.get(&key).is_some_and(|entry| entry.id == id) {
                live.remove(&key);
            }
            queue.close();
            let mut leftovers = Vec::new();
            while let Ok(job) = queue.try_recv() {
                leftovers.push(job);
            }
            if leftovers.is_empty() {
                self.release(source);
                None
            } else {
                Some(self.register(&mut live, key.clone(), leftovers, source))
            }
        };
        if let Some(started) = started {
            self.spawn(key, started);
        }
    }
}

/// A session registered in the table, whose task is to start.
struct Started {
    id: u64,
    receiver: mpsc::Receiver<Job>,
    context: SessionContext,
    source: IpAddr,
}

/// Runs a hook; a panic in it is logged, and the session ends anyway.
async fn run_hook(hook: impl std::future::Future<Output = ()>) {
    if AssertUnwindSafe(hook).catch_unwind().await.is_err() {
        tracing::error!(target: TARGET, "a session hook panicked");
    }
}
