use std::any::Any;
use std::collections::hash_map::RandomState;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::future::{Future, poll_fn};
use std::hash::BuildHasher;
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use tokio::sync::{Notify, oneshot, watch};
use tokio::time::Instant;

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

/// One shard of the session table.
type Shard<K> = Mutex<HashMap<K, Arc<Slot<K>>>>;
type Factory<S> = dyn Fn(SocketAddr) -> S + Send + Sync;
type KeyFn<K> = dyn Fn(&Request) -> K + Send + Sync;

/// A datagram handed to a session, with where its outcome goes.
struct Job {
    request: Request,
    outcome: oneshot::Sender<Outcome>,
}

/// What became of a datagram a session handled.
pub(super) enum Outcome {
    Reply(Option<Bytes>),
    Failed(BoxError),
    Panicked(Box<dyn Any + Send>),
    /// Dropped before a session handled it, for this reason.
    Dropped(DropReason),
}

/// A live session as the table sees it: its queue, and what fair
/// eviction needs to know about it.
///
/// The queue is a `VecDeque` sized to what it holds rather than a channel:
/// a channel block of 32 datagrams (4.6 KiB) per session was most of a
/// session's memory, though a session rarely has more than one datagram
/// waiting.
struct Slot<K> {
    key: K,
    id: u64,
    /// The source whose share this session counts in.
    source: IpAddr,
    /// When it last began a turn (a datagram or its idle timeout):
    /// nanoseconds since the table was built; `u64::MAX` while it handles a
    /// datagram.
    active: AtomicU64,
    /// Its place in its source's list in the [`Ledger`] (changed only under
    /// the ledger's lock).
    position: AtomicUsize,
    inbox: Mutex<Inbox>,
}

struct Inbox {
    jobs: VecDeque<Job>,
    /// The session's task, waiting for a datagram.
    waiter: Option<Waker>,
    /// No datagram will be added: the session was evicted, or has ended.
    closed: bool,
}

/// Why a datagram could not be queued to a session.
enum Push {
    /// The queue holds `queue_size` datagrams: the datagram is given back.
    Full(Job),
    /// The session has ended, or is ending: the datagram is given back.
    Closed(Job),
}

impl<K> Slot<K> {
    fn new(key: K, id: u64, source: IpAddr, jobs: VecDeque<Job>, active: u64) -> Self {
        Self {
            key,
            id,
            source,
            active: AtomicU64::new(active),
            position: AtomicUsize::new(0),
            inbox: Mutex::new(Inbox {
                jobs,
                waiter: None,
                closed: false,
            }),
        }
    }

    fn inbox(&self) -> MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `job` unless the queue holds `capacity` or is closed.
    // The datagram is given back by move: boxing it would allocate per drop.
    #[allow(clippy::result_large_err)]
    fn push(&self, job: Job, capacity: usize) -> Result<(), Push> {
        let mut inbox = self.inbox();
        if inbox.closed {
            return Err(Push::Closed(job));
        }
        if inbox.jobs.len() >= capacity {
            return Err(Push::Full(job));
        }
        inbox.jobs.push_back(job);
        let waiter = inbox.waiter.take();
        drop(inbox);
        if let Some(waiter) = waiter {
            waiter.wake();
        }
        Ok(())
    }

    /// The next queued datagram; `None` once the queue is closed and empty.
    fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Option<Job>> {
        let mut inbox = self.inbox();
        if let Some(job) = inbox.jobs.pop_front() {
            return Poll::Ready(Some(job));
        }
        if inbox.closed {
            return Poll::Ready(None);
        }
        match &mut inbox.waiter {
            Some(waiter) if waiter.will_wake(cx.waker()) => {}
            waiter => *waiter = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// Closes the queue; returns what it still held.
    fn close(&self) -> VecDeque<Job> {
        let mut inbox = self.inbox();
        inbox.closed = true;
        let waiter = inbox.waiter.take();
        let jobs = std::mem::take(&mut inbox.jobs);
        drop(inbox);
        if let Some(waiter) = waiter {
            waiter.wake();
        }
        jobs
    }

    /// Closes the queue but leaves what it holds to the session, which
    /// handles it and then ends.
    fn evict(&self) {
        let mut inbox = self.inbox();
        inbox.closed = true;
        let waiter = inbox.waiter.take();
        drop(inbox);
        if let Some(waiter) = waiter {
            waiter.wake();
        }
    }
}

/// Sessions of the heaviest source an eviction compares, at most.
const EVICTION_SAMPLE: usize = 64;

/// Who holds which sessions: the places taken in the table, by source.
struct Ledger<K> {
    /// The sessions of each source that holds any.
    held: HashMap<IpAddr, Vec<Arc<Slot<K>>>>,
    /// The sources by how many sessions they hold, to find the heaviest.
    by_load: BTreeSet<(usize, IpAddr)>,
    /// Where the next eviction's sample starts.
    hand: usize,
}

impl<K> Default for Ledger<K> {
    fn default() -> Self {
        Self {
            held: HashMap::new(),
            by_load: BTreeSet::new(),
            hand: 0,
        }
    }
}

impl<K> Ledger<K> {
    fn held(&self, source: IpAddr) -> usize {
        self.held.get(&source).map_or(0, Vec::len)
    }

    fn add(&mut self, slot: Arc<Slot<K>>) {
        let list = self.held.entry(slot.source).or_default();
        let before = list.len();
        slot.position.store(before, Ordering::Relaxed);
        self.by_load.remove(&(before, slot.source));
        self.by_load.insert((before + 1, slot.source));
        list.push(slot);
    }

    fn remove(&mut self, slot: &Arc<Slot<K>>) {
        let Some(list) = self.held.get_mut(&slot.source) else {
            return;
        };
        let position = slot.position.load(Ordering::Relaxed);
        if !list
            .get(position)
            .is_some_and(|held| Arc::ptr_eq(held, slot))
        {
            return;
        }
        let before = list.len();
        list.swap_remove(position);
        if let Some(moved) = list.get(position) {
            moved.position.store(position, Ordering::Relaxed);
        }
        self.by_load.remove(&(before, slot.source));
        if before > 1 {
            self.by_load.insert((before - 1, slot.source));
        } else {
            self.held.remove(&slot.source);
        }
    }

    /// The session to evict for a newcomer from `source`: the least
    /// recently active of the source holding the most (among
    /// [`EVICTION_SAMPLE`] of its sessions, from a hand that moves on at
    /// each eviction, so the work under this lock stays bounded), if that
    /// source holds at least two more than `source` (so that shares only
    /// get more even).
    fn victim(&mut self, source: IpAddr) -> Option<Arc<Slot<K>>> {
        let &(most, heaviest) = self.by_load.last()?;
        if most < self.held(source) + 2 {
            return None;
        }
        let list = self.held.get(&heaviest)?;
        let start = self.hand % list.len();
        self.hand = self.hand.wrapping_add(EVICTION_SAMPLE);
        list.iter()
            .cycle()
            .skip(start)
            .take(EVICTION_SAMPLE.min(list.len()))
            .min_by_key(|slot| slot.active.load(Ordering::Relaxed))
            .cloned()
    }
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
#[derive(Clone, Copy)]
enum Refusal {
    /// `max_sessions` are live, and no source holds enough more than the
    /// newcomer's to give up one.
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
    live: Box<[Shard<K>]>,
    hasher: RandomState,
    /// Live sessions in all shards.
    count: AtomicUsize,
    /// Which source holds which sessions. Locked when a session starts or
    /// ends, never for a datagram of a live session; always after a shard
    /// when both are held.
    ledger: Mutex<Ledger<K>>,
    /// The zero of the sessions' activity times.
    epoch: Instant,
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
    evicted: AtomicU64,
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
    /// Datagrams from new peers dropped because `max_sessions` were live
    /// and no source held enough more than theirs to give up a session, or
    /// because their source held its share
    /// ([`SessionsBuilder::max_sessions_per_source`]).
    pub refused: u64,
    /// Of `refused`, those refused because their source held its share.
    pub refused_per_source: u64,
    /// Datagrams dropped because their session's queue was full.
    pub queue_full: u64,
    /// Sessions ended to make room for a new peer while `max_sessions`
    /// were live: each the least recently active session of the source
    /// holding the most ([`Session::on_evict`]).
    pub evicted: u64,
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
    /// while bounding the memory and tasks they hold, about 1.7 KiB each
    /// besides their state). When all are taken, a new peer evicts the
    /// least recently active session of the source holding the most, if
    /// that source holds at least two more than the newcomer's; else its
    /// datagram is refused (see the [module docs](super#bounds)).
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
                ledger: Mutex::default(),
                epoch: Instant::now(),
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
            evicted: load(&c.evicted),
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
    fn shard(&self, key: &K) -> MutexGuard<'_, HashMap<K, Arc<Slot<K>>>> {
        let index = self.hasher.hash_one(key) as usize % SHARDS;
        self.live[index].lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<S, K> Registry<S, K> {
    fn ledger(&self) -> MutexGuard<'_, Ledger<K>> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `at` as a session's activity time.
    fn stamp(&self, at: Instant) -> u64 {
        let since = at.saturating_duration_since(self.epoch);
        u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
    }

    /// Whether the table and `source`'s share have room for one more.
    fn room(&self, ledger: &Ledger<K>, source: IpAddr) -> Result<(), Refusal> {
        if ledger.held(source) >= self.max_per_source {
            Err(Refusal::SourceFull)
        } else if self.count.load(Ordering::Acquire) >= self.max_sessions {
            Err(Refusal::Full)
        } else {
            Ok(())
        }
    }

    /// Gives back the place of an ended or evicted session.
    fn release(&self, slot: &Arc<Slot<K>>) {
        let mut ledger = self.ledger();
        ledger.remove(slot);
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
    Evicted,
}

/// What woke a session. Lives on the session's stack for one turn:
/// boxing the datagram would allocate for each.
#[allow(clippy::large_enum_variant)]
enum Event {
    Datagram(Job),
    Evicted,
    ShutDown,
    Idle,
}

/// What became of a datagram offered to the table.
enum Routed<K> {
    /// Queued to its live session.
    Queued,
    /// Queued to a new session, whose task is to start.
    Started(Arc<Slot<K>>),
    /// Not taken: its session's queue is full.
    QueueFull(Job),
    /// Not taken: no session could be started for it.
    Refused(Job, Refusal),
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
    /// error is the reason it was dropped.
    pub(super) fn dispatch(
        self: &Arc<Self>,
        request: Request,
        outcome: oneshot::Sender<Outcome>,
    ) -> Result<(), DropReason> {
        self.route(Job { request, outcome })
            .map_err(|(reason, _)| reason)
    }

    /// [`dispatch`](Self::dispatch), giving back a dropped datagram with
    /// the reason. When the table is full, a new peer may evict a session
    /// of the heaviest source ([`Ledger::victim`]) and try once more.
    // The datagram is given back by move: boxing it would allocate per drop.
    #[allow(clippy::result_large_err)]
    fn route(self: &Arc<Self>, job: Job) -> Result<(), (DropReason, Job)> {
        let key = (self.key)(&job.request);
        let mut job = job;
        let mut evicted = false;
        loop {
            match self.enqueue(&key, job) {
                Routed::Queued => return Ok(()),
                Routed::Started(slot) => {
                    self.spawn(slot);
                    return Ok(());
                }
                Routed::QueueFull(full) => {
                    self.counters.queue_full.fetch_add(1, Ordering::Relaxed);
                    return Err((DropReason::Overloaded, full));
                }
                Routed::Refused(refused, Refusal::Full)
                    if !evicted && self.evict_for(source_of(refused.request.peer())) =>
                {
                    evicted = true;
                    job = refused;
                }
                Routed::Refused(refused, refusal) => {
                    self.counters.refused.fetch_add(1, Ordering::Relaxed);
                    let per_source = matches!(refusal, Refusal::SourceFull);
                    if per_source {
                        self.counters
                            .refused_per_source
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::debug!(target: TARGET, peer = %refused.request.peer(), per_source, "session refused");
                    return Err((DropReason::Overloaded, refused));
                }
            }
        }
    }

    /// Queues `job` to the session of `key`, registering a new one if
    /// there is room. Only the key's shard (and, for a new session, the
    /// ledger) is locked, and nothing slow runs under them: the session's
    /// state is made, and its task spawned, after they are released.
    fn enqueue(&self, key: &K, job: Job) -> Routed<K> {
        let mut live = self.shard(key);
        let job = match live.get(key) {
            None => job,
            Some(slot) => match slot.push(job, self.queue_size) {
                Ok(()) => return Routed::Queued,
                Err(Push::Full(job)) => return Routed::QueueFull(job),
                // The session's task is gone without unregistering (its
                // runtime was dropped): replace it.
                Err(Push::Closed(job)) => {
                    if let Some(gone) = live.remove(key) {
                        self.release(&gone);
                    }
                    job
                }
            },
        };
        let source = source_of(job.request.peer());
        let mut ledger = self.ledger();
        if let Err(refusal) = self.room(&ledger, source) {
            return Routed::Refused(job, refusal);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(Slot::new(
            key.clone(),
            id,
            source,
            VecDeque::from([job]),
            self.stamp(Instant::now()),
        ));
        self.count.fetch_add(1, Ordering::AcqRel);
        ledger.add(slot.clone());
        drop(ledger);
        live.insert(key.clone(), slot.clone());
        Routed::Started(slot)
    }

    /// Evicts a session to make room for a new peer from `source`, if a
    /// source holds enough more than it; the evicted session handles what
    /// it has queued, then ends. Whether a place may have come free.
    fn evict_for(&self, source: IpAddr) -> bool {
        let Some(victim) = self.ledger().victim(source) else {
            return false;
        };
        let mut live = self.shard(&victim.key);
        if live
            .get(&victim.key)
            .is_some_and(|slot| Arc::ptr_eq(slot, &victim))
        {
            live.remove(&victim.key);
            victim.evict();
            self.release(&victim);
            self.counters.evicted.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(target: TARGET, id = victim.id, source = %victim.source, "session evicted");
        }
        // Else it ended meanwhile, giving back its place.
        true
    }

    /// Starts the task of a registered session; its state is made there.
    fn spawn(self: &Arc<Self>, slot: Arc<Slot<K>>) {
        self.counters.created.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        self.publish_metrics();
        self.running.fetch_add(1, Ordering::AcqRel);
        let context = match slot.inbox().jobs.front() {
            Some(first) => SessionContext {
                peer: first.request.peer(),
                sender: first.request.sender().clone(),
            },
            None => unreachable!("a session starts with a datagram"),
        };
        tracing::debug!(target: TARGET, peer = %context.peer, id = slot.id, "session start");
        let alive = Alive {
            registry: self.clone(),
            slot,
        };
        tokio::spawn(alive.run(context));
    }

    /// Unregisters a session. Datagrams that reached its queue after it
    /// decided to end go, in order, to a fresh session for the same key,
    /// which keeps its place in the source's share.
    fn finish(self: &Arc<Self>, slot: &Arc<Slot<K>>) {
        let (fresh, stray) = {
            let mut live = self.shard(&slot.key);
            let leftovers = slot.close();
            let registered = live
                .get(&slot.key)
                .is_some_and(|held| Arc::ptr_eq(held, slot));
            if !registered {
                // Evicted: its place is already given back.
                (None, leftovers)
            } else if leftovers.is_empty() {
                live.remove(&slot.key);
                self.release(slot);
                (None, leftovers)
            } else {
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                let fresh = Arc::new(Slot::new(
                    slot.key.clone(),
                    id,
                    slot.source,
                    leftovers,
                    self.stamp(Instant::now()),
                ));
                let mut ledger = self.ledger();
                ledger.remove(slot);
                ledger.add(fresh.clone());
                drop(ledger);
                live.insert(slot.key.clone(), fresh.clone());
                (Some(fresh), VecDeque::new())
            }
        };
        if let Some(fresh) = fresh {
            self.spawn(fresh);
        }
        // An evicted session that ended on its own before handling all it
        // had queued: those datagrams take their chances as new ones.
        for job in stray {
            if let Err((reason, job)) = self.route(job) {
                let _ = job.outcome.send(Outcome::Dropped(reason));
            }
        }
    }
}

/// A running session: its table and its slot. Dropped when the task
/// ends, however it ends, it lets [`Sessions::shutdown`] know; and a
/// session that did not get to [`Registry::finish`] (its task dropped
/// with its runtime) gives back its place, and the datagrams it had queued
/// are answered as dropped (`overloaded`) rather than left waiting.
struct Alive<S, K: Hash + Eq> {
    registry: Arc<Registry<S, K>>,
    slot: Arc<Slot<K>>,
}

impl<S, K: Hash + Eq> Drop for Alive<S, K> {
    fn drop(&mut self) {
        let stray = {
            let mut live = self.registry.shard(&self.slot.key);
            let queued = self.slot.close();
            if live
                .get(&self.slot.key)
                .is_some_and(|held| Arc::ptr_eq(held, &self.slot))
            {
                live.remove(&self.slot.key);
                self.registry.release(&self.slot);
            }
            queued
        };
        for job in stray {
            let _ = job.outcome.send(Outcome::Dropped(DropReason::Overloaded));
        }
        self.registry.running.fetch_sub(1, Ordering::AcqRel);
        self.registry.ended.notify_waiters();
    }
}

impl<S: Session, K: Hash + Eq + Clone + Send + Sync + 'static> Alive<S, K> {
    async fn run(self, mut context: SessionContext) {
        let registry = &self.registry;
        let slot = &self.slot;
        let made = std::panic::catch_unwind(AssertUnwindSafe(|| (registry.factory)(context.peer)));
        let mut state = match made {
            Ok(state) => state,
            Err(panic) => {
                // The first datagram carries the panic to the server.
                if let Some(first) = slot.inbox().jobs.pop_front() {
                    let _ = first.outcome.send(Outcome::Panicked(panic));
                }
                tracing::error!(target: TARGET, peer = %context.peer, "the session factory panicked");
                registry.counters.panicked.fetch_add(1, Ordering::Relaxed);
                registry.finish(slot);
                return;
            }
        };
        let mut shutdown = registry.shutdown.subscribe();
        let mut idle_timeout = registry.idle_timeout;
        let mut next_wait: Option<Duration> = None;
        // One timer for the session's life, reset at each turn.
        let idle = tokio::time::sleep(idle_timeout);
        tokio::pin!(idle);
        let end = loop {
            let wait = next_wait.take().unwrap_or(idle_timeout);
            // Each turn marks the session active: one clock read serves the
            // timer and eviction's choice of the least recently active.
            let now = Instant::now();
            idle.as_mut().reset(now + wait);
            slot.active.store(registry.stamp(now), Ordering::Relaxed);
            let event = tokio::select! {
                // Queued datagrams first: shutdown waits until the queue is empty.
                biased;
                job = poll_fn(|cx| slot.poll_next(cx)) => match job {
                    Some(job) => Event::Datagram(job),
                    None => Event::Evicted,
                },
                () = async { drop(shutdown.wait_for(|stopping| *stopping).await) } => Event::ShutDown,
                () = idle.as_mut() => Event::Idle,
            };
            let step = match event {
                Event::Datagram(job) => {
                    // Busy: not a candidate for eviction until its next turn.
                    slot.active.store(u64::MAX, Ordering::Relaxed);
                    context.sender = job.request.sender().clone();
                    match AssertUnwindSafe(state.handle(job.request))
                        .catch_unwind()
                        .await
                    {
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
                Event::Evicted => break End::Evicted,
                Event::ShutDown => break End::ShutDown,
                Event::Idle => {
                    registry.counters.timed_out.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(target: TARGET, peer = %context.peer, id = slot.id, "session idle");
                    match AssertUnwindSafe(state.on_idle(&context))
                        .catch_unwind()
                        .await
                    {
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
        let counters = &registry.counters;
        let counter = match &end {
            End::Closed => {
                run_hook(state.on_close(&context)).await;
                Some(&counters.closed)
            }
            End::Failed(error) => {
                if let Some(error) = error {
                    run_hook(state.on_error(error, &context)).await;
                }
                Some(&counters.failed)
            }
            End::Panicked => Some(&counters.panicked),
            End::ShutDown => {
                run_hook(state.on_shutdown(&context)).await;
                Some(&counters.shut_down)
            }
            // Counted when it was evicted.
            End::Evicted => {
                run_hook(state.on_evict(&context)).await;
                None
            }
        };
        if let Some(counter) = counter {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        // A destructor that panics must not keep the session from ending.
        if std::panic::catch_unwind(AssertUnwindSafe(move || drop(state))).is_err() {
            tracing::error!(target: TARGET, peer = %context.peer, "a session's state panicked when dropped");
        }
        registry.finish(slot);
        tracing::debug!(target: TARGET, peer = %context.peer, id = slot.id, "session stop");
    }
}

/// Runs a hook; a panic in it is logged, and the session ends anyway.
async fn run_hook(hook: impl std::future::Future<Output = ()>) {
    if AssertUnwindSafe(hook).catch_unwind().await.is_err() {
        tracing::error!(target: TARGET, "a session hook panicked");
    }
}
