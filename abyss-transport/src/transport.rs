use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::task::{Context, Poll};

/// A bound datagram endpoint.
///
/// The trait is shaped after quinn's `AsyncUdpSocket`: it is poll-based, takes
/// `&self` (one transport may be shared by a reader and by send handles), is
/// dyn-compatible, and moves datagrams in batches. An implementation that can
/// only move one datagram per system call simply returns `1`.
///
/// # Contract
///
/// * [`poll_recv`](Transport::poll_recv) fills up to
///   `min(bufs.len(), meta.len())` datagrams, one per buffer (or, with GRO,
///   several equal-sized segments in one buffer, see [`RecvMeta::stride`]),
///   and returns how many it filled. A datagram longer than its buffer is
///   reported with [`RecvMeta::truncated`] set; it must never look whole.
/// * [`poll_send`](Transport::poll_send) sends a prefix of `transmits` and
///   returns its length. If the first transmit fails, the error is returned
///   and the caller decides whether to skip it; errors on later transmits end
///   the batch early and are reported on the next call.
/// * Errors from either call are per-datagram or transient (ICMP
///   `ECONNREFUSED`, `ENOBUFS`, `EPERM` from a firewall); they never mean the
///   transport is unusable, and callers keep using it.
/// * Several tasks may wait in [`poll_send`](Transport::poll_send) at once
///   (a server's listener and every handler's
///   [`SendHandle`](https://docs.rs/abyss/latest/abyss/struct.SendHandle.html)):
///   each one that got `Poll::Pending` must be woken when the endpoint can
///   send again, not only the last.
///
/// # Example
///
/// An adapter that counts what an inner transport receives:
///
/// ```
/// use std::io::{self, IoSliceMut};
/// use std::net::SocketAddr;
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use std::task::{Context, Poll};
/// use abyss_transport::{RecvMeta, Transmit, Transport};
///
/// #[derive(Debug)]
/// struct Counting<T> { inner: T, received: AtomicU64 }
///
/// impl<T: Transport> Transport for Counting<T> {
///     fn poll_recv(&self, cx: &mut Context<'_>, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta])
///         -> Poll<io::Result<usize>>
///     {
///         let polled = self.inner.poll_recv(cx, bufs, meta);
///         if let Poll::Ready(Ok(n)) = &polled {
///             self.received.fetch_add(*n as u64, Ordering::Relaxed);
///         }
///         polled
///     }
///     fn poll_send(&self, cx: &mut Context<'_>, transmits: &[Transmit<'_>]) -> Poll<io::Result<usize>> {
///         self.inner.poll_send(cx, transmits)
///     }
///     fn local_addr(&self) -> io::Result<SocketAddr> {
///         self.inner.local_addr()
///     }
/// }
/// ```
pub trait Transport: Send + Sync + fmt::Debug + 'static {
    /// Receives up to `min(bufs.len(), meta.len())` datagrams.
    ///
    /// Returns `Poll::Pending` (and arranges a wake-up) when nothing is
    /// queued. On `Ready(Ok(n))`, `meta[..n]` describe `bufs[..n]`.
    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>>;

    /// Sends a prefix of `transmits`, returning how many were sent.
    ///
    /// Returns `Poll::Pending` (and arranges a wake-up) when the send buffer
    /// is full.
    fn poll_send(
        &self,
        cx: &mut Context<'_>,
        transmits: &[Transmit<'_>],
    ) -> Poll<io::Result<usize>>;

    /// The local address the transport is bound to.
    fn local_addr(&self) -> io::Result<SocketAddr>;

    /// How many datagrams one [`poll_recv`](Transport::poll_recv) call can
    /// fill at most; callers size their batches with it.
    fn max_receive_batch(&self) -> usize {
        1
    }

    /// How many transmits one [`poll_send`](Transport::poll_send) call can
    /// send at most.
    fn max_transmit_batch(&self) -> usize {
        1
    }

    /// How many datagrams one receive buffer may hold at most (GRO); 1 when
    /// the transport never coalesces. A caller that sees a value above 1
    /// gives each buffer 64 KiB and splits it by [`RecvMeta::stride`].
    fn max_receive_segments(&self) -> usize {
        1
    }

    /// How many datagrams one [`Transmit`] may carry at most with
    /// [`Transmit::segment_size`] (GSO); 1 when the transport cannot.
    fn max_transmit_segments(&self) -> usize {
        1
    }

    /// Datagrams the operating system dropped on this endpoint because its
    /// receive queue was full, where the system reports it (Linux:
    /// `SO_MEMINFO`, read when called; one system call, so callers ask when
    /// they report, not per datagram); `None` where it does not.
    fn kernel_drops(&self) -> Option<u64> {
        None
    }

    /// Stops taking new datagrams, before the endpoint is closed.
    ///
    /// What is already queued stays readable with
    /// [`poll_recv`](Transport::poll_recv), which returns `Poll::Pending`
    /// once it is empty; what arrives afterwards is either not this
    /// endpoint's (the system hands it to the other members of the group,
    /// or treats it as sent to a closed port) or dropped and counted in
    /// [`kernel_drops`](Transport::kernel_drops). A server calls this when a
    /// listener begins to drain, and reads and counts what is left when it
    /// closes, so that nothing the system accepted goes uncounted. The
    /// default does nothing (what arrives between the last read and the
    /// close is then lost uncounted).
    fn stop_receiving(&self) -> io::Result<()> {
        Ok(())
    }
}

/// What [`Transport::poll_recv`] reports about one received buffer.
///
/// Built with [`Default`] and filled in by the transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecvMeta {
    /// Source address of the datagram (the peer).
    pub peer: SocketAddr,
    /// Bytes written into the buffer. With GRO this covers several segments.
    pub len: usize,
    /// Size of each segment when several datagrams were coalesced into one
    /// buffer (GRO); equal to `len` otherwise. The last segment may be
    /// shorter.
    pub stride: usize,
    /// The address the datagram was sent to, where the transport can tell
    /// (Linux `IP_PKTINFO` / `IPV6_RECVPKTINFO`). This can be a broadcast or
    /// multicast address.
    pub dst_ip: Option<IpAddr>,
    /// The local address a reply to this datagram is sent from, where the
    /// transport can tell: `dst_ip` for a datagram sent to one of this
    /// host's addresses, the receiving interface's own address for one sent
    /// to a broadcast address (Linux `IP_PKTINFO`'s `ipi_spec_dst`). `None`
    /// lets the system choose.
    pub local_ip: Option<IpAddr>,
    /// The datagram did not fit its buffer and was cut short by the system.
    /// The first `len` bytes are all that is left of it.
    pub truncated: bool,
}

impl Default for RecvMeta {
    fn default() -> Self {
        Self {
            peer: SocketAddr::from(([0, 0, 0, 0], 0)),
            len: 0,
            stride: 0,
            dst_ip: None,
            local_ip: None,
            truncated: false,
        }
    }
}

impl RecvMeta {
    /// Describes one whole datagram of `len` bytes from `peer`.
    pub fn new(peer: SocketAddr, len: usize) -> Self {
        Self {
            peer,
            len,
            stride: len,
            ..Self::default()
        }
    }

    /// How many datagrams the buffer holds: `len` split by `stride` (GRO),
    /// at least 1 (an empty datagram is a datagram too, and so is a
    /// truncated one).
    pub fn datagrams(&self) -> usize {
        if self.truncated || self.len == 0 {
            return 1;
        }
        self.len.div_ceil(self.segment_size())
    }

    /// The size of each datagram in the buffer but the last: `stride`, or
    /// `len` where the transport left `stride` at 0.
    pub fn segment_size(&self) -> usize {
        if self.stride == 0 {
            self.len.max(1)
        } else {
            self.stride
        }
    }

    /// Whether the datagram was sent to a group of hosts (a multicast or a
    /// broadcast address) rather than to this host alone: every socket
    /// bound to the port gets its own copy of such a datagram. Known only
    /// where the transport reports [`dst_ip`](RecvMeta::dst_ip) (and, for a
    /// subnet broadcast address, [`local_ip`](RecvMeta::local_ip)).
    pub fn is_group_addressed(&self) -> bool {
        let Some(dst) = self.dst_ip.map(|ip| ip.to_canonical()) else {
            return false;
        };
        match dst {
            IpAddr::V4(v4) if v4.is_broadcast() || v4.is_multicast() => true,
            IpAddr::V6(v6) if v6.is_multicast() => true,
            // For IPv4 the system answers a datagram sent to one of its own
            // addresses from that address: a different local address means
            // the destination was a (subnet) broadcast address.
            IpAddr::V4(_) => self
                .local_ip
                .is_some_and(|local| local.to_canonical() != dst),
            IpAddr::V6(_) => false,
        }
    }
}

/// One datagram (or, with [`segment_size`](Transmit::segment_size), a run of
/// equal-sized datagrams to one destination) for [`Transport::poll_send`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Transmit<'a> {
    /// Where to send it.
    pub destination: SocketAddr,
    /// The payload.
    pub contents: &'a [u8],
    /// Source address to send from, for sockets bound to a wildcard address
    /// (`IP_PKTINFO` / `IPV6_PKTINFO`). `None` lets the system choose.
    pub src_ip: Option<IpAddr>,
    /// With GSO, `contents` holds several datagrams of this size (the last
    /// may be shorter). `None` means one datagram.
    pub segment_size: Option<usize>,
}

impl<'a> Transmit<'a> {
    /// One datagram to `destination`, from whatever source the system picks.
    pub fn new(destination: SocketAddr, contents: &'a [u8]) -> Self {
        Self {
            destination,
            contents,
            src_ip: None,
            segment_size: None,
        }
    }

    /// Sends from `src_ip` (for example the address a request was sent to).
    #[must_use]
    pub fn with_src_ip(mut self, src_ip: Option<IpAddr>) -> Self {
        self.src_ip = src_ip;
        self
    }
}
