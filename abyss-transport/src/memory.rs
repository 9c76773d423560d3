//! An in-process datagram network for deterministic tests.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;

use crate::{Bind, RecvMeta, Transmit, Transport};

/// How many datagrams an endpoint queues before it drops, like a kernel
/// receive buffer.
const DEFAULT_QUEUE: usize = 1024;

/// An in-process datagram network: endpoints bound on it exchange datagrams
/// through bounded queues, in order, with no loss but for full queues.
///
/// Cloning gives another handle to the same network. Ports are handed out
/// from 49152 upwards, in order, so tests are deterministic. A datagram to an
/// address nobody is bound to vanishes, as UDP's would. An endpoint bound to
/// `0.0.0.0` or `::` receives datagrams for any address of its family on its
/// port and sees the address they were sent to in [`RecvMeta::dst_ip`].
///
/// [`MemoryNetwork`] is a [`Bind`], so an Abyss server can serve on it.
///
/// # Example
///
/// ```
/// use std::future::poll_fn;
/// use std::io::IoSliceMut;
/// use abyss_transport::{MemoryNetwork, RecvMeta, Transmit, Transport};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> std::io::Result<()> {
/// let net = MemoryNetwork::new();
/// let a = net.bind("10.0.0.1:53".parse().unwrap())?;
/// let b = net.bind("10.0.0.2:0".parse().unwrap())?;
/// poll_fn(|cx| b.poll_send(cx, &[Transmit::new(a.local_addr()?, b"query")])).await?;
///
/// let mut buf = [0u8; 3];
/// let mut meta = [RecvMeta::default()];
/// poll_fn(|cx| a.poll_recv(cx, &mut [IoSliceMut::new(&mut buf)], &mut meta)).await?;
/// assert_eq!(meta[0].peer, b.local_addr()?);
/// assert!(meta[0].truncated, "5 bytes do not fit a 3-byte buffer");
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Default)]
pub struct MemoryNetwork {
    inner: Arc<Mutex<Registry>>,
}

#[derive(Default)]
struct Registry {
    bound: HashMap<SocketAddr, Vec<Weak<Endpoint>>>,
    next_port: u16,
    queue_capacity: Option<usize>,
}

impl fmt::Debug for MemoryNetwork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let registry = self.lock();
        f.debug_struct("MemoryNetwork")
            .field("bound", &registry.bound.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl MemoryNetwork {
    /// An empty network.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::{MemoryNetwork, Transport};
    ///
    /// let net = MemoryNetwork::new();
    /// let first = net.bind("10.0.0.1:0".parse().unwrap())?;
    /// assert_eq!(first.local_addr()?.port(), 49152, "ports are handed out in order");
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets how many datagrams each endpoint bound from now on queues before
    /// it drops (default 1024).
    ///
    /// # Example
    ///
    /// ```
    /// use std::future::poll_fn;
    /// use abyss_transport::{MemoryNetwork, Transmit, Transport};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// let net = MemoryNetwork::new();
    /// net.set_queue_capacity(2);
    /// let server = net.bind("10.0.0.1:53".parse().unwrap())?;
    /// let client = net.bind("10.0.0.2:0".parse().unwrap())?;
    /// let to = server.local_addr()?;
    /// let burst = [Transmit::new(to, b"1"), Transmit::new(to, b"2"), Transmit::new(to, b"3")];
    /// poll_fn(|cx| client.poll_send(cx, &burst)).await?;
    /// assert_eq!(server.kernel_drops(), Some(1), "the third found the queue full");
    /// # Ok(())
    /// # }
    /// ```
    pub fn set_queue_capacity(&self, datagrams: usize) {
        self.lock().queue_capacity = Some(datagrams.max(1));
    }

    /// Binds one endpoint on `addr`; port 0 picks a free port. Fails with
    /// [`io::ErrorKind::AddrInUse`] if the address is taken.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::{MemoryNetwork, Transport};
    ///
    /// let net = MemoryNetwork::new();
    /// let server = net.bind("10.0.0.1:53".parse().unwrap())?;
    /// assert_eq!(server.local_addr()?, "10.0.0.1:53".parse().unwrap());
    /// let taken = net.bind("10.0.0.1:53".parse().unwrap()).unwrap_err();
    /// assert_eq!(taken.kind(), std::io::ErrorKind::AddrInUse);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn bind(&self, addr: SocketAddr) -> io::Result<MemoryTransport> {
        let mut registry = self.lock();
        registry.prune();
        let addr = registry.resolve(addr)?;
        if registry.bound.contains_key(&addr) {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{addr} is already bound"),
            ));
        }
        Ok(registry.open(self, addr))
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn deliver(&self, from: SocketAddr, transmit: &Transmit<'_>) {
        let target = {
            let mut registry = self.lock();
            registry.find(transmit.destination, from)
        };
        if let Some(endpoint) = target {
            endpoint.push(Datagram {
                from,
                to: transmit.destination.ip(),
                payload: Bytes::copy_from_slice(transmit.contents),
            });
        }
    }
}

impl Bind for MemoryNetwork {
    fn bind_group(&self, addr: SocketAddr, count: usize) -> io::Result<Vec<Arc<dyn Transport>>> {
        let first = self.bind(addr)?;
        let shared = first.local;
        let mut group: Vec<Arc<dyn Transport>> = vec![Arc::new(first)];
        let mut registry = self.lock();
        for _ in 1..count {
            group.push(Arc::new(registry.open(self, shared)));
        }
        Ok(group)
    }

    fn join_group(&self, addr: SocketAddr) -> io::Result<Arc<dyn Transport>> {
        let mut registry = self.lock();
        registry.prune();
        if !registry.bound.contains_key(&addr) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no group is bound on {addr}"),
            ));
        }
        Ok(Arc::new(registry.open(self, addr)))
    }
}

impl Registry {
    fn prune(&mut self) {
        self.bound.retain(|_, group| {
            group.retain(|w| w.strong_count() > 0);
            !group.is_empty()
        });
    }

    fn resolve(&mut self, addr: SocketAddr) -> io::Result<SocketAddr> {
        if addr.port() != 0 {
            return Ok(addr);
        }
        for _ in 0..=u16::MAX {
            self.next_port = self
                .next_port
                .checked_add(1)
                .filter(|p| *p >= 49152)
                .unwrap_or(49152);
            let candidate = SocketAddr::new(addr.ip(), self.next_port);
            if !self.bound.contains_key(&candidate) {
                return Ok(candidate);
            }
        }
        Err(io::Error::new(io::ErrorKind::AddrInUse, "no free port"))
    }

    fn open(&mut self, net: &MemoryNetwork, addr: SocketAddr) -> MemoryTransport {
        let endpoint = Arc::new(Endpoint {
            queue: Mutex::new(Queue::default()),
            capacity: self.queue_capacity.unwrap_or(DEFAULT_QUEUE),
            drops: AtomicU64::new(0),
        });
        self.bound
            .entry(addr)
            .or_default()
            .push(Arc::downgrade(&endpoint));
        MemoryTransport {
            net: net.clone(),
            endpoint,
            local: addr,
        }
    }

    /// The endpoint for `to`, picked within a group by the sender's address
    /// the way `SO_REUSEPORT` hashes a peer to one socket.
    fn find(&mut self, to: SocketAddr, from: SocketAddr) -> Option<Arc<Endpoint>> {
        let wildcard = SocketAddr::new(
            match to {
                SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            },
            to.port(),
        );
        let group = self.bound.get(&to).or_else(|| self.bound.get(&wildcard))?;
        let live: Vec<Arc<Endpoint>> = group.iter().filter_map(Weak::upgrade).collect();
        if live.is_empty() {
            return None;
        }
        let hash = match from.ip() {
            IpAddr::V4(ip) => u64::from(u32::from(ip)),
            IpAddr::V6(ip) => u128::from(ip) as u64,
        } ^ u64::from(from.port()).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        Some(live[(hash % live.len() as u64) as usize].clone())
    }
}

struct Datagram {
    from: SocketAddr,
    to: IpAddr,
    payload: Bytes,
}

#[derive(Default)]
struct Queue {
    datagrams: VecDeque<Datagram>,
    waker: Option<Waker>,
}

struct Endpoint {
    queue: Mutex<Queue>,
    capacity: usize,
    drops: AtomicU64,
}

impl Endpoint {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, datagram: Datagram) {
        let mut queue = self.lock();
        if queue.datagrams.len() >= self.capacity {
            self.drops.fetch_add(1, Ordering::Relaxed);
            return;
        }
        queue.datagrams.push_back(datagram);
        if let Some(waker) = queue.waker.take() {
            waker.wake();
        }
    }
}

/// One endpoint of a [`MemoryNetwork`].
///
/// It moves up to 32 datagrams per call, reports the address each datagram
/// was sent to, counts the datagrams it drops for a full queue in
/// [`kernel_drops`](Transport::kernel_drops), and leaves its group on
/// [`stop_receiving`](Transport::stop_receiving).
///
/// # Example
///
/// ```
/// use std::future::poll_fn;
/// use std::io::IoSliceMut;
/// use abyss_transport::{MemoryNetwork, RecvMeta, Transmit, Transport};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> std::io::Result<()> {
/// let net = MemoryNetwork::new();
/// let server = net.bind("0.0.0.0:53".parse().unwrap())?;
/// let client = net.bind("10.0.0.2:0".parse().unwrap())?;
/// let to = "10.0.0.1:53".parse().unwrap();
/// poll_fn(|cx| client.poll_send(cx, &[Transmit::new(to, b"a"), Transmit::new(to, b"b")])).await?;
///
/// // Both come back in one batch, each with the address it was sent to.
/// let mut storage = [[0u8; 8]; 4];
/// let mut meta = [RecvMeta::default(); 4];
/// let n = poll_fn(|cx| {
///     let mut bufs = storage.each_mut().map(|b| IoSliceMut::new(b));
///     server.poll_recv(cx, &mut bufs, &mut meta)
/// })
/// .await?;
/// assert_eq!(n, 2);
/// assert_eq!(meta[0].dst_ip, Some(to.ip()));
/// # Ok(())
/// # }
/// ```
pub struct MemoryTransport {
    net: MemoryNetwork,
    endpoint: Arc<Endpoint>,
    local: SocketAddr,
}

impl fmt::Debug for MemoryTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryTransport")
            .field("local", &self.local)
            .field("queued", &self.endpoint.lock().datagrams.len())
            .finish()
    }
}

impl Transport for MemoryTransport {
    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let max = bufs.len().min(meta.len());
        let mut queue = self.endpoint.lock();
        if queue.datagrams.is_empty() && max > 0 {
            queue.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let mut filled = 0;
        while filled < max {
            let Some(datagram) = queue.datagrams.pop_front() else {
                break;
            };
            let buf = &mut bufs[filled];
            let len = datagram.payload.len().min(buf.len());
            buf[..len].copy_from_slice(&datagram.payload[..len]);
            let mut m = RecvMeta::new(datagram.from, len);
            m.truncated = len < datagram.payload.len();
            m.dst_ip = Some(datagram.to);
            m.local_ip = Some(datagram.to);
            meta[filled] = m;
            filled += 1;
        }
        Poll::Ready(Ok(filled))
    }

    fn poll_send(
        &self,
        _cx: &mut Context<'_>,
        transmits: &[Transmit<'_>],
    ) -> Poll<io::Result<usize>> {
        for transmit in transmits {
            let from_ip = match (self.local.ip(), transmit.src_ip) {
                (ip, _) if !ip.is_unspecified() => ip,
                (_, Some(src)) => src,
                (IpAddr::V4(_), None) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                (IpAddr::V6(_), None) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            };
            self.net
                .deliver(SocketAddr::new(from_ip, self.local.port()), transmit);
        }
        Poll::Ready(Ok(transmits.len()))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }

    fn max_receive_batch(&self) -> usize {
        32
    }

    fn max_transmit_batch(&self) -> usize {
        32
    }

    fn kernel_drops(&self) -> Option<u64> {
        Some(self.endpoint.drops.load(Ordering::Relaxed))
    }

    /// Leaves the group: new datagrams go to its other members, or vanish
    /// as sent to an unbound address; queued ones stay readable.
    fn stop_receiving(&self) -> io::Result<()> {
        let mut registry = self.net.lock();
        if let Some(group) = registry.bound.get_mut(&self.local) {
            let me = Arc::downgrade(&self.endpoint);
            group.retain(|w| !w.ptr_eq(&me));
        }
        registry.prune();
        Ok(())
    }
}
