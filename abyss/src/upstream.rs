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
//! (so no port lives long enough to be learnt), and reads the answers in
//! batches. The protocol says how requests and answers are matched
//! ([`Correlate`]): [`Correlate::prepare`] readies each request (a fresh
//! random ID, say) and names the key its answer must carry;
//! [`Correlate::key`] reads the key of each answer. An answer from another
//! address, on another socket than its request's, or with a key nobody
//! waits for is dropped and counted as unmatched.
//!
//! It composes with tower: `Timeout`, `Retry` (requests are `Bytes`,
//! cheap to clone), `LoadShed` (readiness is the outstanding bound), and
//! balancing over several upstreams.
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

use std::collections::HashMap;
use std::fmt;
use std::future::{Future, poll_fn};
use std::hash::Hash;
use std::io::{self, IoSliceMut};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::oneshot;
use tower::Service;
use tower::limit::ConcurrencyLimit;

use crate::transport::{RecvMeta, Transmit, Transport, UdpOptions, UdpTransport};

/// The future of a request's answer.
pub type Answer = Pin<Box<dyn Future<Output = Result<Bytes, UpstreamError>> + Send>>;

/// How a protocol's requests and answers are matched; see the [module
/// docs](self).
pub trait Correlate: Send + Sync + 'static {
    /// What an answer must carry to match its request (DNS: the ID and the
    /// question, exactly as sent).
    type Key: Hash + Eq + Clone + Send + Sync + 'static;

    /// Readies `request` to be sent (a fresh random ID, a randomised
    /// question case) and returns the key its answer must carry; `None`
    /// when it cannot be sent (malformed), which fails the call.
    fn prepare(&self, request: &mut BytesMut) -> Option<Self::Key>;

    /// The key `answer` carries; `None` for something that is not an
    /// answer (counted unmatched).
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
    /// another socket, late, or with a key nobody waits for.
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

/// A socket of the pool.
struct Member {
    id: u64,
    transport: Arc<UdpTransport>,
    /// Requests sent from it.
    sent: AtomicU64,
    /// When it was rotated out (nanoseconds since the client's start, plus
    /// one; 0 while in use).
    retired_at: AtomicU64,
}

struct Shared<C: Correlate> {
    addr: SocketAddr,
    correlate: C,
    rotate_after: u64,
    timeout: Duration,
    /// Largest answer read (the receive buffers' size).
    max_answer: usize,
    started: tokio::time::Instant,
    /// Numbers each waiting request, so a request only removes its own.
    tickets: AtomicU64,
    pool: Mutex<Pool>,
    /// Requests waiting for their answer, by key: the socket they left
    /// from, and where their answer goes.
    pending: Mutex<Pending<C::Key>>,
    sent: AtomicU64,
    answered: AtomicU64,
    timed_out: AtomicU64,
    unmatched: AtomicU64,
    rotations: AtomicU64,
}

/// Requests waiting for their answer, by key: the socket each left from,
/// and where its answer goes.
type Pending<K> = HashMap<K, Waiter>;

/// A request waiting for its answer.
struct Waiter {
    /// Tells this request from a later one with the same key.
    ticket: u64,
    /// The socket it left from.
    member: u64,
    /// What was sent, for [`Correlate::accept`].
    request: Bytes,
    answer: oneshot::Sender<Bytes>,
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
    limited: ConcurrencyLimit<Core<C>>,
}

impl<C: Correlate> Clone for Upstream<C> {
    fn clone(&self) -> Self {
        Self {
            limited: self.limited.clone(),
        }
    }
}

impl<C: Correlate> fmt::Debug for Upstream<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("addr", &self.limited.get_ref().shared.addr)
            .finish_non_exhaustive()
    }
}

/// The client without its outstanding bound.
struct Core<C: Correlate> {
    shared: Arc<Shared<C>>,
}

impl<C: Correlate> Clone for Core<C> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
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
        let shared = &self.limited.get_ref().shared;
        let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
        UpstreamStats {
            sent: load(&shared.sent),
            answered: load(&shared.answered),
            timed_out: load(&shared.timed_out),
            unmatched: load(&shared.unmatched),
            rotations: load(&shared.rotations),
        }
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
        let shared = &self.limited.get_ref().shared;
        shared
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

    /// How long a request waits for its answer (default 2 s).
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
            started: tokio::time::Instant::now(),
            tickets: AtomicU64::new(0),
            pool: Mutex::new(Pool {
                members: Vec::with_capacity(self.sockets),
                next: 0,
                next_id: 0,
            }),
            pending: Mutex::new(HashMap::new()),
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
            limited: ConcurrencyLimit::new(Core { shared }, self.max_outstanding),
        })
    }
}

impl<C: Correlate> Shared<C> {
    /// Nanoseconds since the client started.
    fn elapsed(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn pool(&self) -> MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pending(&self) -> MutexGuard<'_, Pending<C::Key>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh socket on a port the kernel picks, with its reader.
    fn open(self: &Arc<Self>, pool: &mut Pool) -> io::Result<Arc<Member>> {
        let any: SocketAddr = match self.addr {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let transport = Arc::new(UdpTransport::bind(
            any,
            &UdpOptions::new().share_port(false),
        )?);
        pool.next_id += 1;
        let member = Arc::new(Member {
            id: pool.next_id,
            transport,
            sent: AtomicU64::new(0),
            retired_at: AtomicU64::new(0),
        });
        tokio::spawn(read_answers(Arc::downgrade(self), member.clone()));
        Ok(member)
    }

    /// Registers `request`, sent from socket `member`, as waiting for the
    /// answer with `key`; `None` if that key is already waited for.
    fn wait_for(
        &self,
        key: &C::Key,
        member: u64,
        request: Bytes,
    ) -> Option<(u64, oneshot::Receiver<Bytes>)> {
        let mut pending = self.pending();
        if pending.contains_key(key) {
            return None;
        }
        let ticket = self.tickets.fetch_add(1, Ordering::Relaxed);
        let (answer, receiver) = oneshot::channel();
        pending.insert(
            key.clone(),
            Waiter {
                ticket,
                member,
                request,
                answer,
            },
        );
        Some((ticket, receiver))
    }

    /// The socket the next request leaves from, replacing one that has
    /// sent its share.
    fn member(self: &Arc<Self>) -> io::Result<Arc<Member>> {
        let mut pool = self.pool();
        let at = pool.next % pool.members.len();
        pool.next = pool.next.wrapping_add(1);
        if pool.members[at].sent.load(Ordering::Relaxed) >= self.rotate_after {
            let fresh = self.open(&mut pool)?;
            // The old socket's reader goes on a timeout longer, for the
            // answers still due on it, then ends.
            pool.members[at]
                .retired_at
                .store(self.elapsed().saturating_add(1), Ordering::Relaxed);
            pool.members[at] = fresh;
            self.rotations.fetch_add(1, Ordering::Relaxed);
        }
        Ok(pool.members[at].clone())
    }
}

/// Reads the answers that come to `member`'s socket and hands each to the
/// request that waits for it. Ends when the client is gone, or when the
/// socket has been rotated out and nothing waits for it any more.
async fn read_answers<C: Correlate>(shared: std::sync::Weak<Shared<C>>, member: Arc<Member>) {
    const BATCH: usize = 32;
    let size = shared.upgrade().map_or(0, |shared| shared.max_answer);
    let mut buffers = vec![vec![0u8; size]; BATCH];
    let mut meta = [RecvMeta::default(); BATCH];
    let mut arena = BytesMut::new();
    loop {
        let received = {
            let transport = &member.transport;
            let idle = tokio::time::sleep(Duration::from_millis(500));
            tokio::pin!(idle);
            poll_fn(|cx| {
                let mut bufs: [IoSliceMut<'_>; BATCH] =
                    std::array::from_fn(|_| IoSliceMut::new(&mut []));
                for (slot, buffer) in bufs.iter_mut().zip(buffers.iter_mut()) {
                    *slot = IoSliceMut::new(buffer);
                }
                match transport.poll_recv(cx, &mut bufs, &mut meta) {
                    Poll::Ready(result) => Poll::Ready(Some(result)),
                    Poll::Pending => idle.as_mut().poll(cx).map(|()| None),
                }
            })
            .await
        };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        // A socket rotated out is read for one timeout more (what was sent
        // from it is due by then), then closed, whatever still comes.
        let retired_at = member.retired_at.load(Ordering::Relaxed);
        if retired_at != 0 {
            let due =
                Duration::from_nanos(retired_at) + shared.timeout + Duration::from_millis(100);
            if shared.started.elapsed() > due {
                return;
            }
        }
        let count = match received {
            Some(Ok(count)) => count,
            // An ICMP error for an earlier send, or a quiet spell.
            Some(Err(_)) | None => continue,
        };
        for (m, buffer) in meta.iter().zip(&buffers).take(count) {
            let answer = &buffer[..m.len.min(buffer.len())];
            let waiter = if m.peer == shared.addr && !m.truncated {
                shared.correlate.key(answer).and_then(|key| {
                    let mut pending = shared.pending();
                    match pending.get(&key) {
                        // Only on the socket its request left from, and
                        // only if it answers what was asked.
                        Some(waiter)
                            if waiter.member == member.id
                                && shared.correlate.accept(&waiter.request, answer) =>
                        {
                            pending.remove(&key)
                        }
                        _ => None,
                    }
                })
            } else {
                None
            };
            match waiter {
                Some(waiter) => {
                    if arena.capacity() < answer.len() {
                        arena.reserve(answer.len().max(64 * 1024));
                    }
                    arena.extend_from_slice(answer);
                    // Counted before the caller can see the answer.
                    shared.answered.fetch_add(1, Ordering::Relaxed);
                    let _ = waiter.answer.send(arena.split().freeze());
                }
                _ => {
                    shared.unmatched.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// Removes a request from the pending table however its future ends.
struct Waiting<C: Correlate> {
    shared: Arc<Shared<C>>,
    key: Option<C::Key>,
    ticket: u64,
}

impl<C: Correlate> Drop for Waiting<C> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            let mut pending = self.shared.pending();
            // Its own entry only: once answered, the key may be waited for
            // by a later request.
            if pending.get(&key).is_some_and(|w| w.ticket == self.ticket) {
                pending.remove(&key);
            }
        }
    }
}

impl<C: Correlate> Service<Bytes> for Core<C> {
    type Response = Bytes;
    type Error = UpstreamError;
    type Future = Answer;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Bytes) -> Self::Future {
        let shared = self.shared.clone();
        Box::pin(async move {
            let mut request = BytesMut::from(request);
            let (answer, waiting, member, request) = {
                let mut tries = 0;
                loop {
                    let key = shared
                        .correlate
                        .prepare(&mut request)
                        .ok_or(UpstreamError::Unprepared)?;
                    let member = shared.member().map_err(UpstreamError::Send)?;
                    let sent = std::mem::take(&mut request).freeze();
                    match shared.wait_for(&key, member.id, sent.clone()) {
                        Some((ticket, receiver)) => {
                            let waiting = Waiting {
                                shared: shared.clone(),
                                key: Some(key),
                                ticket,
                            };
                            break (receiver, waiting, member, sent);
                        }
                        // A key already waited for: prepare afresh (a new ID).
                        None if tries < 16 => {
                            tries += 1;
                            request = BytesMut::from(&sent[..]);
                        }
                        None => return Err(UpstreamError::Unprepared),
                    }
                }
            };
            let to = shared.addr;
            let sent = poll_fn(|cx| {
                member
                    .transport
                    .poll_send(cx, &[Transmit::new(to, &request)])
            })
            .await;
            match sent {
                Ok(n) if n >= 1 => {}
                Ok(_) => {
                    return Err(UpstreamError::Send(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "not sent",
                    )));
                }
                Err(error) => return Err(UpstreamError::Send(error)),
            }
            member.sent.fetch_add(1, Ordering::Relaxed);
            shared.sent.fetch_add(1, Ordering::Relaxed);
            let _waiting = waiting;
            match tokio::time::timeout(shared.timeout, answer).await {
                Ok(Ok(answer)) => Ok(answer),
                Ok(Err(_)) => Err(UpstreamError::Closed),
                Err(_) => {
                    shared.timed_out.fetch_add(1, Ordering::Relaxed);
                    Err(UpstreamError::TimedOut)
                }
            }
        })
    }
}

impl<C: Correlate> Service<Bytes> for Upstream<C> {
    type Response = Bytes;
    type Error = UpstreamError;
    type Future = tower::limit::concurrency::future::ResponseFuture<Answer>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.limited.poll_ready(cx)
    }

    fn call(&mut self, request: Bytes) -> Self::Future {
        self.limited.call(request)
    }
}
