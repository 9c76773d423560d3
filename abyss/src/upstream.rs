//! The upstream side of a proxy: a `tower::Service` that sends a datagram
//! to an upstream server and resolves with the answer that matches it.
//!
//! DNS forwarders, RADIUS and syslog relays, StatsD aggregators and game
//! relays all need it: send a request upstream, match the right answer
//! back, give up after a deadline, bound what is outstanding, and not be
//! fooled by answers that did not come from the upstream or do not match.
//!
//! [`Upstream`] sends each request from one of a pool of sockets bound to
//! ports the kernel picks at random, replaced after a number of requests
//! (so no port lives long enough to be learnt). Each socket has one task
//! that sends what its callers queued many datagrams per system call
//! (`sendmmsg`), reads the answers likewise (`recvmmsg`), and ends the
//! requests whose deadline passed, with one timer for all of them. The
//! protocol says how requests and answers are matched ([`Correlate`]):
//! [`Correlate::prepare`] readies each request (a fresh random ID, say)
//! and names the key its answer must carry; [`Correlate::key`] reads the
//! key of each answer. An answer from another address, on another socket
//! than its request's, or with a key nobody waits for is dropped and
//! counted as unmatched.
//!
//! Nothing is allocated per request: requests and answers are copied into
//! shared 64 KiB arenas, waiting requests live in reused slots, and the
//! answer comes as a [`BytesMut`] a proxy can rewrite in place (its
//! client's ID, say) and send on.
//!
//! It composes with tower: `Timeout`, `Retry` (requests are `Bytes`,
//! cheap to clone), `LoadShed` (readiness is the outstanding bound), and
//! balancing over several upstreams. [`Upstream::try_call`] sheds at the
//! bound without tower.
//!
//! # Example
//!
//! A protocol whose requests and answers start with an 8-byte ID:
//!
//! ```
//! use std::time::Duration;
//! use abyss::upstream::{Correlate, Upstream};
//! use abyss::{Bytes, BytesMut, Service, ServiceBuilder};
//! use tower::ServiceExt;
//!
//! struct Tagged;
//!
//! impl Correlate for Tagged {
//!     type Key = u64;
//!
//!     fn prepare(&self, request: &mut BytesMut) -> Option<u64> {
//!         let id: u64 = rand_id();
//!         request.get_mut(..8)?.copy_from_slice(&id.to_be_bytes());
//!         Some(id)
//!     }
//!
//!     fn key(&self, answer: &[u8]) -> Option<u64> {
//!         Some(u64::from_be_bytes(answer.get(..8)?.try_into().ok()?))
//!     }
//! }
//! # fn rand_id() -> u64 { std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 }
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // An upstream that answers with the request itself.
//! let server = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
//! let addr = server.local_addr()?;
//! tokio::spawn(async move {
//!     let mut buf = [0u8; 1500];
//!     while let Ok((n, from)) = server.recv_from(&mut buf).await {
//!         let _ = server.send_to(&buf[..n], from).await;
//!     }
//! });
//!
//! let upstream = Upstream::builder(addr, Tagged)
//!     .timeout(Duration::from_secs(2))
//!     .max_outstanding(100)
//!     .build()?;
//! let answer = upstream
//!     .clone()
//!     .oneshot(Bytes::from_static(b"\0\0\0\0\0\0\0\0hello"))
//!     .await?;
//! assert_eq!(&answer[8..], b"hello");
//! assert_eq!(upstream.stats().answered, 1);
//! # Ok(())
//! # }
//! ```
//!
//! # Several upstreams
//!
//! Clients of several upstreams go behind tower's balancers like any
//! service; here power-of-two-choices over two (tower's `Retry` around
//! it would send a timed-out request again, to either):
//!
//! ```
//! # use std::time::Duration;
//! # use abyss::upstream::{Correlate, Upstream};
//! # use abyss::{Bytes, BytesMut};
//! use tower::balance::p2c::Balance;
//! use tower::discover::ServiceList;
//! use tower::load::Constant;
//! use tower::{Service, ServiceExt};
//! # struct Tagged;
//! # impl Correlate for Tagged {
//! #     type Key = u64;
//! #     fn prepare(&self, request: &mut BytesMut) -> Option<u64> {
//! #         let id = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).ok()?.as_nanos() as u64;
//! #         request.get_mut(..8)?.copy_from_slice(&id.to_be_bytes());
//! #         Some(id)
//! #     }
//! #     fn key(&self, answer: &[u8]) -> Option<u64> {
//! #         Some(u64::from_be_bytes(answer.get(..8)?.try_into().ok()?))
//! #     }
//! # }
//! # async fn echo_server() -> std::net::SocketAddr {
//! #     let server = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
//! #     let addr = server.local_addr().unwrap();
//! #     tokio::spawn(async move {
//! #         let mut buf = [0u8; 1500];
//! #         while let Ok((n, from)) = server.recv_from(&mut buf).await {
//! #             let _ = server.send_to(&buf[..n], from).await;
//! #         }
//! #     });
//! #     addr
//! # }
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let (first, second) = (echo_server().await, echo_server().await);
//! let clients = [first, second].map(|addr| {
//!     let client = Upstream::builder(addr, Tagged)
//!         .timeout(Duration::from_millis(500))
//!         .build()
//!         .expect("a usable upstream");
//!     Constant::new(client, 1)
//! });
//! let mut upstreams = Balance::new(ServiceList::new(clients));
//! for _ in 0..10 {
//!     let answer = upstreams
//!         .ready()
//!         .await?
//!         .call(Bytes::from_static(b"\0\0\0\0\0\0\0\0ping"))
//!         .await?;
//!     assert_eq!(&answer[8..], b"ping");
//! }
//! # Ok(())
//! # }
//! ```
//!
//! The DNS forwarder example tries its upstreams in order instead
//! (failover), with [`Upstream::try_call`].

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::{Future, poll_fn};
use std::hash::Hash;
use std::io::{self, IoSliceMut};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::task::AtomicWaker;
use slab::Slab;
use tokio::time::Instant;
use tower::Service;

use crate::transport::{RecvMeta, Transmit, Transport, UdpOptions, UdpTransport};

/// How a protocol's requests and answers are matched; see the [module
/// docs](self).
pub trait Correlate: Send + Sync + 'static {
    /// What an answer must carry to match its request (DNS: the ID and the
    /// question, exactly as sent).
    type Key: Hash + Eq + Clone + Send + Sync + 'static;

    /// Readies `request` to be sent (a fresh random ID, a randomised
    /// question case) and returns the key its answer must carry; `None`
    /// when it cannot be sent (malformed), which fails the call. When the
    /// key is already waited for, it is called again on its own output
    /// (up to 16 times in all) for another. A panic in it fails the call.
    fn prepare(&self, request: &mut BytesMut) -> Option<Self::Key>;

    /// The key `answer` carries; `None` for something that is not an
    /// answer (counted unmatched).
    ///
    /// `key` and [`accept`](Correlate::accept) run on a socket's task
    /// with the client's table locked: they must not use the client. A
    /// panic in either counts the datagram unmatched.
    fn key(&self, answer: &[u8]) -> Option<Self::Key>;

    /// Whether `answer`, which carries the key of `request` (as sent),
    /// answers it: the place for checks the key cannot hold (DNS: the
    /// question, letter case included). One that does not is counted
    /// unmatched, and the request goes on waiting. Default: yes.
    fn accept(&self, request: &[u8], answer: &[u8]) -> bool {
        let _ = (request, answer);
        true
    }
}

/// Why a request got no answer.
#[derive(Debug)]
#[non_exhaustive]
pub enum UpstreamError {
    /// No matching answer came within the timeout.
    TimedOut,
    /// [`Correlate::prepare`] refused the request.
    Unprepared,
    /// The upstream cannot be used (an unusable address or option, at
    /// build) or the request could not be sent; the cause is the source.
    Send(io::Error),
    /// The client's sockets are gone (its runtime shut down).
    Closed,
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamError::TimedOut => f.write_str("no answer from the upstream in time"),
            UpstreamError::Unprepared => f.write_str("the request could not be prepared"),
            // The cause is the source, not repeated here.
            UpstreamError::Send(_) => f.write_str("cannot use the upstream"),
            UpstreamError::Closed => f.write_str("the upstream client is closed"),
        }
    }
}

impl std::error::Error for UpstreamError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            UpstreamError::Send(error) => Some(error),
            _ => None,
        }
    }
}

/// Counters of an [`Upstream`].
///
/// # Example
///
/// See the [module docs](self).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct UpstreamStats {
    /// Requests sent.
    pub sent: u64,
    /// Requests answered.
    pub answered: u64,
    /// Requests that got no answer in time.
    pub timed_out: u64,
    /// Datagrams that matched no request: from another address, on
    /// another socket, late, with a key nobody waits for, or longer than
    /// `max_answer` (cut short by the kernel).
    pub unmatched: u64,
    /// Sockets replaced by fresh ones on new random ports.
    pub rotations: u64,
}

/// Options of an [`Upstream`]; from [`Upstream::builder`].
///
/// # Example
///
/// See the [module docs](self).
pub struct UpstreamBuilder<C> {
    addr: SocketAddr,
    correlate: C,
    sockets: usize,
    rotate_after: u64,
    timeout: Duration,
    max_outstanding: usize,
    max_answer: usize,
}

impl<C> fmt::Debug for UpstreamBuilder<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamBuilder")
            .field("addr", &self.addr)
            .field("sockets", &self.sockets)
            .field("rotate_after", &self.rotate_after)
            .field("timeout", &self.timeout)
            .field("max_outstanding", &self.max_outstanding)
            .finish_non_exhaustive()
    }
}

/// A socket of the pool, with the task that sends its requests and reads
/// its answers.
struct Member {
    id: u64,
    transport: UdpTransport,
    /// Requests given to it (for rotation).
    assigned: AtomicU64,
    /// Whether it has been rotated out: it sends what it was given, reads
    /// the answers due, and closes.
    retired: AtomicBool,
    /// Whether its task has ended (or will: it takes nothing more). Set
    /// and read under the outbox lock, so a request is either queued
    /// before the task's last look or refused.
    closed: AtomicBool,
    outbox: Mutex<Outbox>,
    /// Its task, woken when the outbox gets work or it is retired.
    task: AtomicWaker,
}

/// What a socket's callers hand its task.
struct Outbox {
    /// Requests to send, in order.
    queue: Vec<Outgoing>,
    /// Requests are copied here, many to one allocation, to be prepared.
    arena: BytesMut,
}

/// A prepared request, and the waiting slot its answer goes to.
struct Outgoing {
    request: Bytes,
    slot: usize,
    ticket: u64,
}

impl Member {
    fn outbox(&self) -> MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Shared<C: Correlate> {
    addr: SocketAddr,
    correlate: C,
    rotate_after: u64,
    timeout: Duration,
    /// Largest answer read (the receive buffers' size).
    max_answer: usize,
    max_outstanding: usize,
    /// Each socket's receive buffer: room for the answers due on it.
    recv_buffer: usize,
    pool: Mutex<Pool>,
    table: Mutex<Table<C::Key>>,
    /// Places taken: requests outstanding, and places reserved by
    /// `poll_ready` for the next call.
    outstanding: AtomicUsize,
    /// Callers waiting in `poll_ready` for a place.
    place_waiters: Mutex<Vec<Waker>>,
    has_place_waiters: AtomicBool,
    sent: AtomicU64,
    answered: AtomicU64,
    timed_out: AtomicU64,
    unmatched: AtomicU64,
    rotations: AtomicU64,
}

/// Requests waiting for their answer: a slot each, found by the key their
/// answer must carry while no answer has come.
struct Table<K> {
    slots: Slab<Slot<K>>,
    by_key: HashMap<K, usize>,
    /// Tells a slot from a later one at the same place.
    next_ticket: u64,
}

struct Slot<K> {
    key: K,
    ticket: u64,
    /// The socket its request leaves from; only its answers count.
    member: u64,
    /// What was sent, for [`Correlate::accept`].
    request: Bytes,
    state: SlotState,
}

enum SlotState {
    Waiting(Option<Waker>),
    Done(Result<BytesMut, UpstreamError>),
}

impl<K: Hash + Eq> Table<K> {
    /// Ends slot `slot` (of `ticket`) with `result` if it still waits,
    /// and returns the waker to wake once the table is unlocked.
    fn finish(
        &mut self,
        slot: usize,
        ticket: u64,
        result: Result<BytesMut, UpstreamError>,
    ) -> Option<Waker> {
        let entry = self.slots.get_mut(slot).filter(|s| s.ticket == ticket)?;
        let SlotState::Waiting(waker) = &mut entry.state else {
            return None;
        };
        let waker = waker.take();
        entry.state = SlotState::Done(result);
        if self.by_key.get(&entry.key) == Some(&slot) {
            self.by_key.remove(&entry.key);
        }
        waker
    }

    /// Removes slot `slot` of `ticket`, and its key if it still names it.
    fn remove(&mut self, slot: usize, ticket: u64) {
        if self.slots.get(slot).is_some_and(|s| s.ticket == ticket) {
            let entry = self.slots.remove(slot);
            if self.by_key.get(&entry.key) == Some(&slot) {
                self.by_key.remove(&entry.key);
            }
        }
    }

    /// Whether slot `slot` of `ticket` still waits for its answer.
    fn waiting(&self, slot: usize, ticket: u64) -> bool {
        self.slots
            .get(slot)
            .is_some_and(|s| s.ticket == ticket && matches!(s.state, SlotState::Waiting(_)))
    }
}

struct Pool {
    members: Vec<Arc<Member>>,
    next: usize,
    next_id: u64,
}

/// A client of one upstream server; see the [module docs](self).
///
/// Cheap to clone: clones share the sockets, the outstanding bound and
/// the counters.
///
/// # Example
///
/// See the [module docs](self).
pub struct Upstream<C: Correlate> {
    shared: Arc<Shared<C>>,
    /// A place reserved by `poll_ready` for the next call.
    reserved: bool,
}

impl<C: Correlate> Clone for Upstream<C> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            reserved: false,
        }
    }
}

impl<C: Correlate> Drop for Upstream<C> {
    fn drop(&mut self) {
        if self.reserved {
            self.shared.release();
        }
    }
}

impl<C: Correlate> fmt::Debug for Upstream<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("addr", &self.shared.addr)
            .finish_non_exhaustive()
    }
}

impl<C: Correlate> Upstream<C> {
    /// A client of the server at `addr`, matching answers with `correlate`.
    ///
    /// # Example
    ///
    /// See the [module docs](self).
    pub fn builder(addr: SocketAddr, correlate: C) -> UpstreamBuilder<C> {
        UpstreamBuilder {
            addr,
            correlate,
            sockets: 4,
            rotate_after: 10_000,
            timeout: Duration::from_secs(2),
            max_outstanding: 1024,
            max_answer: 4096,
        }
    }

    /// The counters.
    ///
    /// # Example
    ///
    /// See the [module docs](self).
    pub fn stats(&self) -> UpstreamStats {
        let shared = &self.shared;
        let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
        UpstreamStats {
            sent: load(&shared.sent),
            answered: load(&shared.answered),
            timed_out: load(&shared.timed_out),
            unmatched: load(&shared.unmatched),
            rotations: load(&shared.rotations),
        }
    }

    /// Sends `request` if fewer than `max_outstanding` requests are
    /// outstanding; `None` at the bound, so a caller sheds load (or tries
    /// another upstream) instead of queueing. The request is copied as it
    /// is prepared: a borrowed slice will do.
    ///
    /// # Example
    ///
    /// ```
    /// # use abyss::upstream::{Correlate, Upstream};
    /// # struct Any;
    /// # impl Correlate for Any {
    /// #     type Key = u8;
    /// #     fn prepare(&self, r: &mut abyss::BytesMut) -> Option<u8> { r.first().copied() }
    /// #     fn key(&self, a: &[u8]) -> Option<u8> { a.first().copied() }
    /// # }
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), abyss::upstream::UpstreamError> {
    /// let upstream = Upstream::builder("127.0.0.1:9".parse().unwrap(), Any)
    ///     .max_outstanding(1)
    ///     .build()?;
    /// let first = upstream.try_call(b"\x01 to the discard port");
    /// assert!(first.is_some());
    /// assert!(upstream.try_call(b"\x02").is_none(), "one outstanding at most");
    /// drop(first);
    /// assert!(upstream.try_call(b"\x03").is_some(), "the place is back");
    /// # Ok(())
    /// # }
    /// ```
    pub fn try_call(&self, request: &[u8]) -> Option<Answer<C>> {
        self.shared
            .try_reserve()
            .then(|| self.shared.answer(request))
    }

    /// The local addresses of the sockets now in use.
    ///
    /// # Example
    ///
    /// ```
    /// # use abyss::upstream::{Correlate, Upstream};
    /// # struct Any;
    /// # impl Correlate for Any {
    /// #     type Key = ();
    /// #     fn prepare(&self, _: &mut abyss::BytesMut) -> Option<()> { Some(()) }
    /// #     fn key(&self, _: &[u8]) -> Option<()> { Some(()) }
    /// # }
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), abyss::upstream::UpstreamError> {
    /// let upstream = Upstream::builder("127.0.0.1:53".parse().unwrap(), Any).sockets(2).build()?;
    /// assert_eq!(upstream.local_addrs().len(), 2);
    /// # Ok(())
    /// # }
    /// ```
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.shared
            .pool()
            .members
            .iter()
            .filter_map(|member| member.transport.local_addr().ok())
            .collect()
    }
}

impl<C: Correlate> UpstreamBuilder<C> {
    /// Sockets in the pool (default 4), each on a port the kernel picks.
    ///
    /// # Example
    ///
    /// See [`Upstream::local_addrs`].
    pub fn sockets(mut self, sockets: usize) -> Self {
        self.sockets = sockets;
        self
    }

    /// Requests a socket sends before it is replaced by one on a fresh
    /// random port (default 10 000); its answers still in flight are read
    /// until they come or time out.
    ///
    /// # Example
    ///
    /// See the tests.
    pub fn rotate_after(mut self, requests: u64) -> Self {
        self.rotate_after = requests;
        self
    }

    /// How long a request waits for its answer (default 2 s), from when
    /// its socket's task takes it to send (at once, unless the socket
    /// cannot take more). Answered requests behind one still waiting are
    /// forgotten when it ends: a socket remembers at most what it sends
    /// in a timeout, 24 bytes each. The sockets' tasks keep the time: on
    /// a runtime that is not running (a current-thread runtime outside
    /// `block_on`), nothing times out; tower's `Timeout` around the client
    /// bounds a request wherever it waits.
    ///
    /// # Example
    ///
    /// See the [module docs](self).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Requests outstanding at most (default 1 024): beyond it the client
    /// is not ready (`poll_ready` is pending), which tower's `LoadShed`
    /// turns into an immediate error.
    ///
    /// # Example
    ///
    /// See the [module docs](self).
    pub fn max_outstanding(mut self, requests: usize) -> Self {
        self.max_outstanding = requests;
        self
    }

    /// The largest answer read, in bytes (default 4 096, at most 65 535):
    /// a longer one is cut short by the kernel and counted unmatched, and
    /// its request times out. Size it to what the protocol asks for (DNS:
    /// the EDNS size the queries advertise).
    ///
    /// # Example
    ///
    /// ```
    /// # use abyss::upstream::{Correlate, Upstream};
    /// # struct Any;
    /// # impl Correlate for Any {
    /// #     type Key = ();
    /// #     fn prepare(&self, _: &mut abyss::BytesMut) -> Option<()> { Some(()) }
    /// #     fn key(&self, _: &[u8]) -> Option<()> { Some(()) }
    /// # }
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), abyss::upstream::UpstreamError> {
    /// let upstream = Upstream::builder("127.0.0.1:53".parse().unwrap(), Any).max_answer(1232).build()?;
    /// # let _ = upstream;
    /// # Ok(())
    /// # }
    /// ```
    pub fn max_answer(mut self, bytes: usize) -> Self {
        self.max_answer = bytes;
        self
    }

    /// Opens the sockets. Must be called inside a tokio runtime.
    ///
    /// # Errors
    ///
    /// [`UpstreamError::Send`] with `InvalidInput` for an unusable option
    /// or an upstream on port 0 or an unspecified address, or the error
    /// opening a socket.
    ///
    /// # Example
    ///
    /// ```
    /// # use abyss::upstream::{Correlate, Upstream};
    /// # struct Any;
    /// # impl Correlate for Any {
    /// #     type Key = ();
    /// #     fn prepare(&self, _: &mut abyss::BytesMut) -> Option<()> { Some(()) }
    /// #     fn key(&self, _: &[u8]) -> Option<()> { Some(()) }
    /// # }
    /// # #[tokio::main]
    /// # async fn main() {
    /// let unusable = Upstream::builder("0.0.0.0:53".parse().unwrap(), Any).build();
    /// assert!(unusable.is_err(), "an unspecified upstream is refused at start");
    /// # }
    /// ```
    pub fn build(self) -> Result<Upstream<C>, UpstreamError> {
        let invalid = |why: &str| {
            UpstreamError::Send(io::Error::new(io::ErrorKind::InvalidInput, why.to_owned()))
        };
        if self.addr.port() == 0 || self.addr.ip().is_unspecified() {
            return Err(invalid(
                "the upstream must be an address and a port, not 0 or unspecified",
            ));
        }
        if self.max_answer == 0 || self.max_answer > 65_535 {
            return Err(invalid("max_answer must be between 1 and 65535 bytes"));
        }
        if self.sockets == 0 || self.rotate_after == 0 || self.max_outstanding == 0 {
            return Err(invalid(
                "sockets, rotate_after and max_outstanding must be at least 1",
            ));
        }
        if self.timeout.is_zero() {
            return Err(invalid("the timeout must be longer than zero"));
        }
        let shared = Arc::new(Shared {
            addr: self.addr,
            correlate: self.correlate,
            rotate_after: self.rotate_after,
            timeout: self.timeout,
            max_answer: self.max_answer,
            max_outstanding: self.max_outstanding,
            recv_buffer: (self.max_outstanding.saturating_mul(self.max_answer) / self.sockets)
                .clamp(256 << 10, 4 << 20),
            pool: Mutex::new(Pool {
                members: Vec::with_capacity(self.sockets),
                next: 0,
                next_id: 0,
            }),
            table: Mutex::new(Table {
                slots: Slab::new(),
                by_key: HashMap::new(),
                next_ticket: 0,
            }),
            outstanding: AtomicUsize::new(0),
            place_waiters: Mutex::new(Vec::new()),
            has_place_waiters: AtomicBool::new(false),
            sent: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
            unmatched: AtomicU64::new(0),
            rotations: AtomicU64::new(0),
        });
        {
            let mut pool = shared.pool();
            for _ in 0..self.sockets {
                let member = shared.open(&mut pool).map_err(UpstreamError::Send)?;
                pool.members.push(member);
            }
        }
        Ok(Upstream {
            shared,
            reserved: false,
        })
    }
}

/// Requests are copied into arenas of this size (one allocation for
/// many), and answers likewise.
const ARENA: usize = 64 * 1024;

/// Datagrams per system call, each way.
const BATCH: usize = 32;

impl<C: Correlate> Drop for Shared<C> {
    fn drop(&mut self) {
        // The sockets' tasks end at their next turn: give them one. (The
        // retired ones, no longer in the pool, end when what is due on
        // them is answered or times out.)
        for member in &self.pool().members {
            member.task.wake();
        }
    }
}

impl<C: Correlate> Shared<C> {
    fn pool(&self) -> MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn table(&self) -> MutexGuard<'_, Table<C::Key>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a place if one is free.
    fn try_reserve(&self) -> bool {
        self.outstanding
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.max_outstanding).then_some(n + 1)
            })
            .is_ok()
    }

    /// Gives a place back, and wakes the callers waiting for one.
    fn release(&self) {
        self.outstanding.fetch_sub(1, Ordering::SeqCst);
        if self.has_place_waiters.load(Ordering::SeqCst) {
            let waiters = {
                let mut waiters = self.place_waiters.lock().unwrap_or_else(|e| e.into_inner());
                self.has_place_waiters.store(false, Ordering::SeqCst);
                std::mem::take(&mut *waiters)
            };
            // All of them: one that is gone would otherwise keep the
            // place from the others.
            for waker in waiters {
                waker.wake();
            }
        }
    }

    /// A fresh socket on a port the kernel picks, with its task.
    fn open(self: &Arc<Self>, pool: &mut Pool) -> io::Result<Arc<Member>> {
        let any: SocketAddr = match self.addr {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        // A burst of answers must not overflow the socket while its task
        // waits for a turn (the system caps the size at its maximum).
        let options = UdpOptions::new()
            .share_port(false)
            .recv_buffer_size(self.recv_buffer);
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            io::Error::other("the upstream client must be used inside a tokio runtime")
        })?;
        // Its one timer, made here: a runtime without timers fails now,
        // not in the task.
        let timer =
            catch_unwind(|| Box::pin(tokio::time::sleep(Duration::ZERO))).map_err(|_| {
                io::Error::other(
                    "the upstream client needs a tokio runtime with timers (enable_time)",
                )
            })?;
        let transport = UdpTransport::bind(any, &options)?;
        pool.next_id += 1;
        let member = Arc::new(Member {
            id: pool.next_id,
            transport,
            assigned: AtomicU64::new(0),
            retired: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            outbox: Mutex::new(Outbox {
                queue: Vec::new(),
                arena: BytesMut::new(),
            }),
            task: AtomicWaker::new(),
        });
        // Made before it is spawned: a task dropped unpolled (its runtime
        // shutting down) still closes the socket to new requests.
        let task = SocketTask {
            shared: Arc::downgrade(self),
            member: member.clone(),
            sending: Vec::new(),
            next_to_send: 0,
            in_flight: VecDeque::new(),
            buffers: Vec::new(),
            meta: [RecvMeta::default(); BATCH],
            answers: BytesMut::new(),
            wake: Vec::new(),
            timer,
            timer_set: false,
        };
        runtime.spawn(run_socket(task));
        Ok(member)
    }

    /// The socket the next request leaves from, replacing one that has
    /// been given its share.
    fn member(self: &Arc<Self>) -> io::Result<Arc<Member>> {
        let mut pool = self.pool();
        let at = pool.next % pool.members.len();
        pool.next = pool.next.wrapping_add(1);
        let current = &pool.members[at];
        if current.closed.load(Ordering::SeqCst) {
            // Its task is gone (its runtime shut down, say): a fresh one
            // on this runtime.
            let fresh = self.open(&mut pool)?;
            pool.members[at] = fresh;
        } else if current.assigned.load(Ordering::Relaxed) >= self.rotate_after {
            let fresh = self.open(&mut pool)?;
            let old = std::mem::replace(&mut pool.members[at], fresh);
            // It sends what it was given, reads the answers still due,
            // then closes.
            old.retired.store(true, Ordering::SeqCst);
            old.task.wake();
            self.rotations.fetch_add(1, Ordering::Relaxed);
        }
        let member = pool.members[at].clone();
        member.assigned.fetch_add(1, Ordering::Relaxed);
        Ok(member)
    }

    /// Sends `request` on a place already taken.
    fn answer(self: &Arc<Self>, request: &[u8]) -> Answer<C> {
        // Made first: if the key's hashing panics while the request is
        // registered, dropping it gives the place back.
        let mut answer = Answer {
            shared: self.clone(),
            state: AnswerState::Failed(UpstreamError::Closed),
        };
        answer.state = match self.send(request) {
            Ok((slot, ticket)) => AnswerState::Waiting { slot, ticket },
            Err(error) => AnswerState::Failed(error),
        };
        answer
    }

    /// Prepares `request`, registers the slot its answer goes to, and
    /// hands it to a socket's task to send.
    fn send(self: &Arc<Self>, request: &[u8]) -> Result<(usize, u64), UpstreamError> {
        // A socket whose task is gone (its runtime shut down) refuses the
        // request, which goes to the fresh socket that replaces it. (A
        // rotated-out socket does not end while a caller holds it.)
        for _ in 0..4 {
            let member = self.member().map_err(UpstreamError::Send)?;
            let (slot, ticket, prepared) = self.register(&member, request)?;
            let was_idle = {
                let mut outbox = member.outbox();
                if member.closed.load(Ordering::SeqCst) {
                    None
                } else {
                    let was_idle = outbox.queue.is_empty();
                    outbox.queue.push(Outgoing {
                        request: prepared,
                        slot,
                        ticket,
                    });
                    Some(was_idle)
                }
            };
            match was_idle {
                // A queue that held something has its wake-up on the way.
                Some(true) => member.task.wake(),
                Some(false) => {}
                None => {
                    self.table().remove(slot, ticket);
                    continue;
                }
            }
            return Ok((slot, ticket));
        }
        Err(UpstreamError::Closed)
    }

    /// Copies and prepares `request` for `member`, and registers the slot
    /// its answer goes to.
    fn register(
        &self,
        member: &Member,
        request: &[u8],
    ) -> Result<(usize, u64, Bytes), UpstreamError> {
        let mut buffer = {
            let mut outbox = member.outbox();
            let arena = &mut outbox.arena;
            if arena.capacity() < request.len() {
                arena.reserve(request.len().max(ARENA));
            }
            arena.extend_from_slice(request);
            arena.split()
        };
        for _ in 0..16 {
            // `prepare` runs outside the client's locks, and a panic in it
            // fails this request only.
            let prepared = catch_unwind(AssertUnwindSafe(|| self.correlate.prepare(&mut buffer)));
            let key = prepared.ok().flatten().ok_or(UpstreamError::Unprepared)?;
            let mut table = self.table();
            if table.by_key.contains_key(&key) {
                // A key already waited for: prepare afresh (a new ID).
                continue;
            }
            let request = std::mem::take(&mut buffer).freeze();
            let ticket = table.next_ticket;
            table.next_ticket += 1;
            let slot = table.slots.insert(Slot {
                key: key.clone(),
                ticket,
                member: member.id,
                request: request.clone(),
                state: SlotState::Waiting(None),
            });
            table.by_key.insert(key, slot);
            return Ok((slot, ticket, request));
        }
        Err(UpstreamError::Unprepared)
    }
}

/// A socket's task: sends what its callers queue, many datagrams per
/// system call; reads the answers likewise and hands each to the request
/// that waits for it; ends the requests whose deadline passed. Ends when
/// the client is gone, or when the socket has been rotated out and
/// nothing is due on it any more.
async fn run_socket<C: Correlate>(mut task: SocketTask<C>) {
    poll_fn(|cx| task.poll(cx)).await;
}

struct SocketTask<C: Correlate> {
    shared: Weak<Shared<C>>,
    member: Arc<Member>,
    /// Taken from the outbox; sent up to `next_to_send`.
    sending: Vec<Outgoing>,
    next_to_send: usize,
    /// Requests handed over, oldest first, with their deadline: the front
    /// is the next to time out.
    in_flight: VecDeque<(Instant, usize, u64)>,
    buffers: Vec<Vec<u8>>,
    meta: [RecvMeta; BATCH],
    /// Answers are copied here, many to one allocation.
    answers: BytesMut,
    /// Wakers of requests ended this turn, woken once the table is free.
    wake: Vec<Waker>,
    /// Fires at the front's deadline (or earlier: it is moved only when it
    /// fires).
    timer: Pin<Box<tokio::time::Sleep>>,
    timer_set: bool,
}

/// Ends the requests still waiting on a socket whose task is gone (the
/// runtime shut down, say): they would otherwise wait forever.
impl<C: Correlate> Drop for SocketTask<C> {
    fn drop(&mut self) {
        {
            let _outbox = self.member.outbox();
            self.member.closed.store(true, Ordering::SeqCst);
        }
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        let mut table = shared.table();
        let waiting: Vec<(usize, u64)> = table
            .slots
            .iter()
            .filter(|(_, s)| s.member == self.member.id && matches!(s.state, SlotState::Waiting(_)))
            .map(|(at, s)| (at, s.ticket))
            .collect();
        for (slot, ticket) in waiting {
            if let Some(waker) = table.finish(slot, ticket, Err(UpstreamError::Closed)) {
                self.wake.push(waker);
            }
        }
        drop(table);
        self.wake.drain(..).for_each(Waker::wake);
    }
}

impl<C: Correlate> SocketTask<C> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(shared) = self.shared.upgrade() else {
            return Poll::Ready(());
        };
        self.member.task.register(cx.waker());
        let now = Instant::now();
        self.take_outbox(&shared, now);
        self.send(cx, &shared);
        self.receive(cx, &shared);
        self.expire(cx, &shared, now);
        if self.member.retired.load(Ordering::SeqCst)
            && self.in_flight.is_empty()
            && self.next_to_send == self.sending.len()
        {
            // Out of the pool, the socket gains no new callers; it ends
            // once none holds it (one may be between choosing it and
            // queueing on it) and nothing is queued, decided under the
            // outbox lock.
            let outbox = self.member.outbox();
            if outbox.queue.is_empty() && Arc::strong_count(&self.member) == 1 {
                self.member.closed.store(true, Ordering::SeqCst);
                return Poll::Ready(());
            }
            drop(outbox);
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }

    /// Takes what callers queued; its deadlines start now.
    fn take_outbox(&mut self, shared: &Shared<C>, now: Instant) {
        if self.next_to_send == self.sending.len() {
            self.sending.clear();
            self.next_to_send = 0;
        }
        let first = self.sending.len();
        {
            let mut outbox = self.member.outbox();
            if self.sending.is_empty() {
                std::mem::swap(&mut self.sending, &mut outbox.queue);
            } else {
                self.sending.append(&mut outbox.queue);
            }
        }
        let deadline = now + shared.timeout;
        self.in_flight.extend(
            self.sending[first..]
                .iter()
                .map(|out| (deadline, out.slot, out.ticket)),
        );
    }

    fn send(&mut self, cx: &mut Context<'_>, shared: &Shared<C>) {
        let to = shared.addr;
        while self.next_to_send < self.sending.len() {
            let batch = &self.sending[self.next_to_send..];
            let n = batch.len().min(BATCH);
            let transmits: [Transmit<'_>; BATCH] = std::array::from_fn(|i| {
                Transmit::new(to, batch.get(i).map_or(&[][..], |out| &out.request[..]))
            });
            match self.member.transport.poll_send(cx, &transmits[..n]) {
                Poll::Ready(Ok(sent)) => {
                    let sent = sent.clamp(1, n);
                    self.next_to_send += sent;
                    shared.sent.fetch_add(sent as u64, Ordering::Relaxed);
                }
                Poll::Ready(Err(error)) => {
                    // The first of the batch cannot be sent: it fails, the
                    // rest go on.
                    let out = &self.sending[self.next_to_send];
                    self.next_to_send += 1;
                    let waker = shared.table().finish(
                        out.slot,
                        out.ticket,
                        Err(UpstreamError::Send(error)),
                    );
                    if let Some(waker) = waker {
                        waker.wake();
                    }
                }
                Poll::Pending => return,
            }
        }
    }

    fn receive(&mut self, cx: &mut Context<'_>, shared: &Shared<C>) {
        if self.buffers.is_empty() {
            self.buffers = vec![vec![0u8; shared.max_answer]; BATCH];
        }
        // Bounded, so one busy socket cannot hold the worker.
        for _ in 0..16 {
            let received = {
                let mut bufs: [IoSliceMut<'_>; BATCH] =
                    std::array::from_fn(|_| IoSliceMut::new(&mut []));
                for (slot, buffer) in bufs.iter_mut().zip(self.buffers.iter_mut()) {
                    *slot = IoSliceMut::new(buffer);
                }
                self.member
                    .transport
                    .poll_recv(cx, &mut bufs, &mut self.meta)
            };
            match received {
                Poll::Ready(Ok(count)) => self.match_answers(shared, count),
                // An ICMP error for an earlier send.
                Poll::Ready(Err(_)) => {}
                Poll::Pending => return,
            }
        }
        cx.waker().wake_by_ref();
    }

    /// Hands each of the `count` datagrams received to the request waiting
    /// for it, or counts it unmatched.
    fn match_answers(&mut self, shared: &Shared<C>, count: usize) {
        let mut table = shared.table();
        let mut unmatched = 0;
        for (m, buffer) in self.meta.iter().zip(&self.buffers).take(count) {
            let answer = &buffer[..m.len.min(buffer.len())];
            // The protocol's code (and its key's hashing) may panic: that
            // datagram is unmatched, the task goes on.
            let found = (m.peer == shared.addr && !m.truncated)
                .then(|| {
                    catch_unwind(AssertUnwindSafe(|| {
                        let key = shared.correlate.key(answer)?;
                        let slot = *table.by_key.get(&key)?;
                        let entry = &table.slots[slot];
                        // Only on the socket its request left from, and
                        // only if it answers what was asked.
                        (entry.member == self.member.id
                            && shared.correlate.accept(&entry.request, answer))
                        .then_some((slot, entry.ticket))
                    }))
                    .ok()
                    .flatten()
                })
                .flatten();
            let Some((slot, ticket)) = found else {
                unmatched += 1;
                continue;
            };
            if self.answers.capacity() < answer.len() {
                self.answers.reserve(answer.len().max(ARENA));
            }
            self.answers.extend_from_slice(answer);
            let answer = self.answers.split();
            // Counted before the caller can see the answer.
            shared.answered.fetch_add(1, Ordering::Relaxed);
            if let Some(waker) = table.finish(slot, ticket, Ok(answer)) {
                self.wake.push(waker);
            }
        }
        // What was answered leaves the front of the deadlines.
        while let Some(&(_, slot, ticket)) = self.in_flight.front() {
            if table.waiting(slot, ticket) {
                break;
            }
            self.in_flight.pop_front();
        }
        drop(table);
        if unmatched > 0 {
            shared.unmatched.fetch_add(unmatched, Ordering::Relaxed);
        }
        self.wake.drain(..).for_each(Waker::wake);
    }

    /// Ends the requests whose deadline passed, and sets the timer for the
    /// next.
    fn expire(&mut self, cx: &mut Context<'_>, shared: &Shared<C>, now: Instant) {
        loop {
            let Some(&(deadline, ..)) = self.in_flight.front() else {
                return;
            };
            if deadline <= now {
                let mut table = shared.table();
                while let Some(&(deadline, slot, ticket)) = self.in_flight.front() {
                    if table.waiting(slot, ticket) {
                        if deadline > now {
                            break;
                        }
                        shared.timed_out.fetch_add(1, Ordering::Relaxed);
                        if let Some(waker) =
                            table.finish(slot, ticket, Err(UpstreamError::TimedOut))
                        {
                            self.wake.push(waker);
                        }
                    }
                    self.in_flight.pop_front();
                }
                drop(table);
                self.wake.drain(..).for_each(Waker::wake);
                continue;
            }
            // Moved only once it fired: deadlines only grow, so a timer
            // set for an earlier front fires early, once, and is moved on
            // at the next turn.
            if !self.timer_set {
                self.timer.as_mut().reset(deadline);
                self.timer_set = true;
            }
            if self.timer.as_mut().poll(cx).is_ready() {
                self.timer_set = false;
                cx.waker().wake_by_ref();
            }
            return;
        }
    }
}

/// The future of a request's answer.
///
/// # Example
///
/// See the [module docs](self).
#[must_use = "futures do nothing unless polled"]
pub struct Answer<C: Correlate> {
    shared: Arc<Shared<C>>,
    state: AnswerState,
}

enum AnswerState {
    Waiting { slot: usize, ticket: u64 },
    Failed(UpstreamError),
    Finished,
}

impl<C: Correlate> fmt::Debug for Answer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Answer").finish_non_exhaustive()
    }
}

impl<C: Correlate> Future for Answer<C> {
    type Output = Result<BytesMut, UpstreamError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let result = match std::mem::replace(&mut this.state, AnswerState::Finished) {
            AnswerState::Waiting { slot, ticket } => {
                let mut table = this.shared.table();
                match table.slots.get_mut(slot).filter(|s| s.ticket == ticket) {
                    Some(entry) => match &mut entry.state {
                        SlotState::Waiting(waker) => {
                            if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                                *waker = Some(cx.waker().clone());
                            }
                            this.state = AnswerState::Waiting { slot, ticket };
                            return Poll::Pending;
                        }
                        SlotState::Done(_) => match table.slots.remove(slot).state {
                            SlotState::Done(result) => result,
                            SlotState::Waiting(_) => unreachable!("checked above"),
                        },
                    },
                    None => Err(UpstreamError::Closed),
                }
            }
            AnswerState::Failed(error) => Err(error),
            // Polled after it finished: its place was given back then.
            AnswerState::Finished => return Poll::Ready(Err(UpstreamError::Closed)),
        };
        this.shared.release();
        Poll::Ready(result)
    }
}

impl<C: Correlate> Drop for Answer<C> {
    fn drop(&mut self) {
        match std::mem::replace(&mut self.state, AnswerState::Finished) {
            AnswerState::Finished => return,
            AnswerState::Waiting { slot, ticket } => {
                // Its own key only: once answered, the key may be waited
                // for by a later request.
                self.shared.table().remove(slot, ticket);
            }
            AnswerState::Failed(_) => {}
        }
        self.shared.release();
    }
}

impl<C: Correlate> Service<Bytes> for Upstream<C> {
    type Response = BytesMut;
    type Error = UpstreamError;
    type Future = Answer<C>;

    /// Ready while fewer than `max_outstanding` requests are outstanding;
    /// a place is then reserved for the next call.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.reserved {
            return Poll::Ready(Ok(()));
        }
        let shared = &self.shared;
        if !shared.try_reserve() {
            {
                let mut waiters = shared
                    .place_waiters
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
                    waiters.push(cx.waker().clone());
                }
                shared.has_place_waiters.store(true, Ordering::SeqCst);
            }
            // A place freed before the waker was in: take it now.
            if !shared.try_reserve() {
                return Poll::Pending;
            }
        }
        self.reserved = true;
        Poll::Ready(Ok(()))
    }

    /// Sends `request`. Called without `poll_ready` first, it takes a
    /// place over the bound.
    fn call(&mut self, request: Bytes) -> Self::Future {
        if !std::mem::take(&mut self.reserved) {
            self.shared.outstanding.fetch_add(1, Ordering::SeqCst);
        }
        self.shared.answer(&request)
    }
}
