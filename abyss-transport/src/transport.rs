use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::task::{Context, Poll};

/// A bound datagram endpoint.
///
/// The trait is shaped after quinn's `AsyncUdpSocket`: it is poll-based, takes
/// `&self` (one transport may be shared by a reader and by send handles), is
/// dyn-compatible, and moves datagrams in batches. An implementation that can
/// only move one datagram per system call simply returns `1`.
///
/// `Arc<T>` and `Box<T>` are transports when `T` is (`T` may be
/// `dyn Transport`), forwarding every method.
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
/// # Wrapping a transport
///
/// Callers size their batches with the capability methods
/// ([`max_receive_batch`](Transport::max_receive_batch),
/// [`max_transmit_batch`](Transport::max_transmit_batch),
/// [`max_receive_segments`](Transport::max_receive_segments),
/// [`max_transmit_segments`](Transport::max_transmit_segments)) and rely on
/// [`kernel_drops`](Transport::kernel_drops) and
/// [`stop_receiving`](Transport::stop_receiving) to account for every
/// datagram. A transport that wraps another one returns it from
/// [`inner`](Transport::inner): every one of those methods it does not
/// implement itself then forwards to the wrapped transport, so the wrapper
/// keeps its batching, GRO, GSO and drop counter. Without `inner`, they
/// report a transport that moves one datagram at a time and counts no
/// drops. Override a method only where the wrapper changes the answer (one
/// that hands the wrapped transport fewer buffers than it is given must
/// report its own `max_receive_batch`).
///
/// # Example
///
/// A wrapper that counts what a transport receives, and keeps its batching:
///
/// ```
/// use std::io::{self, IoSliceMut};
/// use std::net::SocketAddr;
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use std::task::{Context, Poll};
/// use abyss_transport::{RecvMeta, Transmit, Transport, UdpOptions, UdpTransport};
///
/// #[derive(Debug)]
/// struct Counting<T> {
///     inner: T,
///     received: AtomicU64,
/// }
///
/// impl<T: Transport> Transport for Counting<T> {
///     fn poll_recv(
///         &self,
///         cx: &mut Context<'_>,
///         bufs: &mut [IoSliceMut<'_>],
///         meta: &mut [RecvMeta],
///     ) -> Poll<io::Result<usize>> {
///         let polled = self.inner.poll_recv(cx, bufs, meta);
///         if let Poll::Ready(Ok(n)) = &polled {
///             let datagrams: usize = meta[..*n].iter().map(RecvMeta::datagrams).sum();
///             self.received.fetch_add(datagrams as u64, Ordering::Relaxed);
///         }
///         polled
///     }
///
///     fn poll_send(&self, cx: &mut Context<'_>, transmits: &[Transmit<'_>]) -> Poll<io::Result<usize>> {
///         self.inner.poll_send(cx, transmits)
///     }
///
///     fn local_addr(&self) -> io::Result<SocketAddr> {
///         self.inner.local_addr()
///     }
///
///     // Batch sizes, GRO/GSO segments, kernel drops and stop_receiving
///     // all forward to the wrapped transport.
///     fn inner(&self) -> Option<&dyn Transport> {
///         Some(&self.inner)
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> io::Result<()> {
/// let udp = UdpTransport::bind("127.0.0.1:0".parse().unwrap(), &UdpOptions::new())?;
/// let batch = udp.max_receive_batch();
/// let counting = Counting { inner: udp, received: AtomicU64::new(0) };
/// assert_eq!(counting.max_receive_batch(), batch); // 32 on Linux
/// assert_eq!(counting.kernel_drops(), counting.inner.kernel_drops());
/// # Ok(())
/// # }
/// ```
///
/// A shared or boxed transport is a transport too:
///
/// ```
/// use std::sync::Arc;
/// use abyss_transport::{Transport, UdpOptions, UdpTransport};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> std::io::Result<()> {
/// fn batch(transport: &impl Transport) -> usize {
///     transport.max_receive_batch()
/// }
///
/// let udp = Arc::new(UdpTransport::bind("127.0.0.1:0".parse().unwrap(), &UdpOptions::new())?);
/// let boxed: Box<dyn Transport> = Box::new(udp.clone());
/// assert_eq!(batch(&udp), udp.as_ref().max_receive_batch());
/// assert_eq!(batch(&boxed), udp.as_ref().max_receive_batch());
/// # Ok(())
/// # }
/// ```
pub trait Transport: Send + Sync + fmt::Debug + 'static {
    /// Receives up to `min(bufs.len(), meta.len())` datagrams.
    ///
    /// Returns `Poll::Pending` (and arranges a wake-up) when nothing is
    /// queued. On `Ready(Ok(n))`, `meta[..n]` describe `bufs[..n]`.
    ///
    /// # Example
    ///
    /// ```
    /// use std::future::poll_fn;
    /// use std::io::IoSliceMut;
    /// use abyss_transport::{RecvMeta, Transport, UdpOptions, UdpTransport};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// let server = UdpTransport::bind("127.0.0.1:0".parse().unwrap(), &UdpOptions::new())?;
    /// let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    /// client.send_to(b"one", server.local_addr()?).await?;
    ///
    /// // One buffer and one RecvMeta per datagram the batch may hold.
    /// let batch = server.max_receive_batch().min(8);
    /// let mut storage = vec![[0u8; 1500]; batch];
    /// let mut meta = vec![RecvMeta::default(); batch];
    /// let n = poll_fn(|cx| {
    ///     let mut bufs: Vec<IoSliceMut<'_>> = storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
    ///     server.poll_recv(cx, &mut bufs, &mut meta)
    /// })
    /// .await?;
    /// assert!(n >= 1);
    /// assert_eq!(&storage[0][..meta[0].len], b"one");
    /// # Ok(())
    /// # }
    /// ```
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
    ///
    /// # Example
    ///
    /// ```
    /// use std::future::poll_fn;
    /// use abyss_transport::{Transmit, Transport, UdpOptions, UdpTransport};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// let transport = UdpTransport::bind("127.0.0.1:0".parse().unwrap(), &UdpOptions::new())?;
    /// let peer = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    /// let to = peer.local_addr()?;
    /// let transmits = [Transmit::new(to, b"a"), Transmit::new(to, b"b")];
    ///
    /// // A prefix is sent each call: go on until all are.
    /// let mut sent = 0;
    /// while sent < transmits.len() {
    ///     sent += poll_fn(|cx| transport.poll_send(cx, &transmits[sent..])).await?;
    /// }
    /// let mut buf = [0u8; 8];
    /// assert_eq!(peer.recv(&mut buf).await?, 1);
    /// # Ok(())
    /// # }
    /// ```
    fn poll_send(
        &self,
        cx: &mut Context<'_>,
        transmits: &[Transmit<'_>],
    ) -> Poll<io::Result<usize>>;

    /// The local address the transport is bound to.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::{Transport, UdpOptions, UdpTransport};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// let transport = UdpTransport::bind("127.0.0.1:0".parse().unwrap(), &UdpOptions::new())?;
    /// let addr = transport.local_addr()?;
    /// assert_ne!(addr.port(), 0, "port 0 was given a free port");
    /// # Ok(())
    /// # }
    /// ```
    fn local_addr(&self) -> io::Result<SocketAddr>;

    /// The transport this one wraps, if it is a wrapper; `None` (the
    /// default) otherwise.
    ///
    /// Every other provided method of this trait forwards to the transport
    /// returned here, so a wrapper that returns it keeps the wrapped
    /// transport's batching, GRO/GSO, drop counter and
    /// [`stop_receiving`](Transport::stop_receiving) without writing each
    /// of them (see [Wrapping a transport](Transport#wrapping-a-transport)).
    ///
    /// # Example
    ///
    /// ```
    /// use std::io::{self, IoSliceMut};
    /// use std::net::SocketAddr;
    /// use std::task::{Context, Poll};
    /// use abyss_transport::{RecvMeta, Transmit, Transport, UdpOptions, UdpTransport};
    ///
    /// /// Logs every send error, and is otherwise the transport it wraps.
    /// #[derive(Debug)]
    /// struct LogSendErrors<T>(T);
    ///
    /// impl<T: Transport> Transport for LogSendErrors<T> {
    ///     fn poll_recv(&self, cx: &mut Context<'_>, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta])
    ///         -> Poll<io::Result<usize>>
    ///     {
    ///         self.0.poll_recv(cx, bufs, meta)
    ///     }
    ///     fn poll_send(&self, cx: &mut Context<'_>, transmits: &[Transmit<'_>]) -> Poll<io::Result<usize>> {
    ///         let polled = self.0.poll_send(cx, transmits);
    ///         if let Poll::Ready(Err(error)) = &polled {
    ///             eprintln!("send to {} failed: {error}", transmits[0].destination);
    ///         }
    ///         polled
    ///     }
    ///     fn local_addr(&self) -> io::Result<SocketAddr> {
    ///         self.0.local_addr()
    ///     }
    ///     fn inner(&self) -> Option<&dyn Transport> {
    ///         Some(&self.0)
    ///     }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> io::Result<()> {
    /// let udp = UdpTransport::bind("127.0.0.1:0".parse().unwrap(), &UdpOptions::new())?;
    /// let (batch, segments) = (udp.max_transmit_batch(), udp.max_transmit_segments());
    /// let logged = LogSendErrors(udp);
    /// assert_eq!(logged.max_transmit_batch(), batch);
    /// assert_eq!(logged.max_transmit_segments(), segments);
    /// # Ok(())
    /// # }
    /// ```
    fn inner(&self) -> Option<&dyn Transport> {
        None
    }

    /// How many datagrams one [`poll_recv`](Transport::poll_recv) call can
    /// fill at most; callers size their batches with it. The default is
    /// the [`inner`](Transport::inner) transport's, or 1.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::{Transport, UdpOptions, UdpTransport};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// let transport = UdpTransport::bind("127.0.0.1:0".parse().unwrap(), &UdpOptions::new())?;
    /// let expected = if cfg!(target_os = "linux") { 32 } else { 1 }; // recvmmsg
    /// assert_eq!(transport.max_receive_batch(), expected);
    /// # Ok(())
    /// # }
    /// ```
    fn max_receive_batch(&self) -> usize {
        self.inner().map_or(1, Transport::max_receive_batch)
    }

    /// How many transmits one [`poll_send`](Transport::poll_send) call can
    /// send at most. The default is the [`inner`](Transport::inner)
    /// transport's, or 1.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::{Transport, UdpOptions, UdpTransport};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// let transport = UdpTransport::bind("127.0.0.1:0".parse().unwrap(), &UdpOptions::new())?;
    /// let expected = if cfg!(target_os = "linux") { 32 } else { 1 }; // sendmmsg
    /// assert_eq!(transport.max_transmit_batch(), expected);
    /// # Ok(())
    /// # }
    /// ```
    fn max_transmit_batch(&self) -> usize {
        self.inner().map_or(1, Transport::max_transmit_batch)
    }

    /// How many datagrams one receive buffer may hold at most (GRO); 1 when
    /// the transport never coalesces. A caller that sees a value above 1
    /// gives each buffer 64 KiB and splits it by [`RecvMeta::stride`]. The
    /// default is the [`inner`](Transport::inner) transport's, or 1.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::{Transport, UdpOptions, UdpTransport};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// let plain = UdpTransport::bind("127.0.0.1:0".parse().unwrap(), &UdpOptions::new())?;
    /// assert_eq!(plain.max_receive_segments(), 1, "GRO is off by default");
    /// let gro = UdpTransport::bind("127.0.0.1:0".parse().unwrap(), &UdpOptions::new().gro(true))?;
    /// assert!(gro.max_receive_segments() >= 1, "above 1 where the kernel has GRO");
    /// # Ok(())
    /// # }
    /// ```
    fn max_receive_segments(&self) -> usize {
        self.inner().map_or(1, Transport::max_receive_segments)
    }

    /// How many datagrams one [`Transmit`] may carry at most with
    /// [`Transmit::segment_size`] (GSO); 1 when the transport cannot. The
    /// default is the [`inner`](Transport::inner) transport's, or 1.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::{Transport, UdpOptions, UdpTransport};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// let options = UdpOptions::new().gso(false);
    /// let transport = UdpTransport::bind("127.0.0.1:0".parse().unwrap(), &options)?;
    /// assert_eq!(transport.max_transmit_segments(), 1);
    /// # Ok(())
    /// # }
    /// ```
    fn max_transmit_segments(&self) -> usize {
        self.inner().map_or(1, Transport::max_transmit_segments)
    }

    /// Datagrams the operating system dropped on this endpoint because its
    /// receive queue was full, where the system reports it (Linux:
    /// `SO_MEMINFO`, read when called; one system call, so callers ask when
    /// they report, not per datagram); `None` where it does not. The
    /// default is the [`inner`](Transport::inner) transport's, or `None`.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::{Transport, UdpOptions, UdpTransport};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// let transport = UdpTransport::bind("127.0.0.1:0".parse().unwrap(), &UdpOptions::new())?;
    /// if let Some(drops) = transport.kernel_drops() {
    ///     assert_eq!(drops, 0, "nothing was sent yet");
    /// }
    /// # Ok(())
    /// # }
    /// ```
    fn kernel_drops(&self) -> Option<u64> {
        self.inner().and_then(Transport::kernel_drops)
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
    /// default forwards to the [`inner`](Transport::inner) transport, or
    /// does nothing (what arrives between the last read and the close is
    /// then lost uncounted).
    ///
    /// # Example
    ///
    /// ```
    /// use std::future::poll_fn;
    /// use std::io::IoSliceMut;
    /// use abyss_transport::{RecvMeta, Transport, UdpOptions, UdpTransport};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// let server = UdpTransport::bind("127.0.0.1:0".parse().unwrap(), &UdpOptions::new())?;
    /// let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    /// client.send_to(b"queued", server.local_addr()?).await?;
    /// server.as_tokio().readable().await?; // it is in the queue
    ///
    /// server.stop_receiving()?;
    /// // What was queued before is still read.
    /// let mut buf = [0u8; 16];
    /// let mut meta = [RecvMeta::default()];
    /// poll_fn(|cx| server.poll_recv(cx, &mut [IoSliceMut::new(&mut buf)], &mut meta)).await?;
    /// assert_eq!(&buf[..meta[0].len], b"queued");
    /// # Ok(())
    /// # }
    /// ```
    fn stop_receiving(&self) -> io::Result<()> {
        self.inner().map_or(Ok(()), Transport::stop_receiving)
    }

    /// The operating system's socket under this transport, if it has one:
    /// what a server hands to a successor process
    /// ([`BoundSockets::receive`](crate::BoundSockets::receive)). The
    /// default is the [`inner`](Transport::inner) transport's, or none.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::{Transport, UdpOptions, UdpTransport};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// let udp = UdpTransport::bind("127.0.0.1:0".parse().unwrap(), &UdpOptions::new())?;
    /// assert!(udp.socket().is_some());
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(unix)]
    fn socket(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.inner().and_then(Transport::socket)
    }
}

macro_rules! forward_transport {
    ($($pointer:ident),*) => {
        $(
            /// Forwards every method to the transport it points to.
            impl<T: Transport + ?Sized> Transport for $pointer<T> {
                fn poll_recv(
                    &self,
                    cx: &mut Context<'_>,
                    bufs: &mut [IoSliceMut<'_>],
                    meta: &mut [RecvMeta],
                ) -> Poll<io::Result<usize>> {
                    (**self).poll_recv(cx, bufs, meta)
                }

                fn poll_send(
                    &self,
                    cx: &mut Context<'_>,
                    transmits: &[Transmit<'_>],
                ) -> Poll<io::Result<usize>> {
                    (**self).poll_send(cx, transmits)
                }

                fn local_addr(&self) -> io::Result<SocketAddr> {
                    (**self).local_addr()
                }

                fn inner(&self) -> Option<&dyn Transport> {
                    (**self).inner()
                }

                #[cfg(unix)]
                fn socket(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
                    (**self).socket()
                }

                fn max_receive_batch(&self) -> usize {
                    (**self).max_receive_batch()
                }

                fn max_transmit_batch(&self) -> usize {
                    (**self).max_transmit_batch()
                }

                fn max_receive_segments(&self) -> usize {
                    (**self).max_receive_segments()
                }

                fn max_transmit_segments(&self) -> usize {
                    (**self).max_transmit_segments()
                }

                fn kernel_drops(&self) -> Option<u64> {
                    (**self).kernel_drops()
                }

                fn stop_receiving(&self) -> io::Result<()> {
                    (**self).stop_receiving()
                }
            }
        )*
    };
}

forward_transport!(Arc, Box);

/// What [`Transport::poll_recv`] reports about one received buffer.
///
/// Built with [`Default`] and filled in by the transport.
///
/// # Example
///
/// Splitting a buffer that holds several datagrams (GRO) by its stride:
///
/// ```
/// use abyss_transport::RecvMeta;
///
/// let buffer = [1u8; 2500];
/// // What a GRO-capable transport reports for three datagrams of 1000,
/// // 1000 and 500 bytes from one peer.
/// let mut meta = RecvMeta::new("192.0.2.1:5353".parse().unwrap(), buffer.len());
/// meta.stride = 1000;
///
/// let datagrams: Vec<&[u8]> = buffer[..meta.len].chunks(meta.segment_size()).collect();
/// assert_eq!(datagrams.len(), meta.datagrams());
/// assert_eq!(datagrams.iter().map(|d| d.len()).collect::<Vec<_>>(), [1000, 1000, 500]);
/// ```
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
    /// The index of the interface it arrived on, where the transport can
    /// tell (Linux `IP_PKTINFO`, `IPV6_PKTINFO`).
    pub interface: Option<u32>,
    /// Its TOS (IPv4) or traffic class (IPv6) byte, DSCP and ECN, when
    /// asked for ([`UdpOptions::receive_tos`](crate::UdpOptions::receive_tos)).
    pub tos: Option<u8>,
    /// When the kernel received it, when asked for
    /// ([`UdpOptions::receive_timestamps`](crate::UdpOptions::receive_timestamps)).
    pub timestamp: Option<std::time::SystemTime>,
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
            interface: None,
            tos: None,
            timestamp: None,
        }
    }
}

impl RecvMeta {
    /// Describes one whole datagram of `len` bytes from `peer`.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::RecvMeta;
    ///
    /// let meta = RecvMeta::new("192.0.2.1:53".parse().unwrap(), 512);
    /// assert_eq!((meta.len, meta.stride, meta.datagrams()), (512, 512, 1));
    /// assert!(!meta.truncated);
    /// assert_eq!(meta.dst_ip, None);
    /// ```
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
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::RecvMeta;
    ///
    /// let mut meta = RecvMeta::new("192.0.2.1:53".parse().unwrap(), 3000);
    /// assert_eq!(meta.datagrams(), 1);
    /// meta.stride = 1200; // GRO: 1200 + 1200 + 600
    /// assert_eq!(meta.datagrams(), 3);
    /// assert_eq!(RecvMeta::new("192.0.2.1:53".parse().unwrap(), 0).datagrams(), 1);
    /// ```
    pub fn datagrams(&self) -> usize {
        if self.truncated || self.len == 0 {
            return 1;
        }
        self.len.div_ceil(self.segment_size())
    }

    /// The size of each datagram in the buffer but the last: `stride`, or
    /// `len` where the transport left `stride` at 0.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::RecvMeta;
    ///
    /// let mut meta = RecvMeta::new("192.0.2.1:53".parse().unwrap(), 3000);
    /// meta.stride = 1200;
    /// assert_eq!(meta.segment_size(), 1200);
    /// meta.stride = 0;
    /// assert_eq!(meta.segment_size(), 3000);
    /// ```
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
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::RecvMeta;
    ///
    /// let mut meta = RecvMeta::new("192.0.2.1:5353".parse().unwrap(), 40);
    /// assert!(!meta.is_group_addressed(), "unknown destination");
    ///
    /// meta.dst_ip = Some("224.0.0.251".parse().unwrap()); // mDNS
    /// assert!(meta.is_group_addressed());
    ///
    /// // Sent to 192.0.2.255, answered from the interface's 192.0.2.10.
    /// meta.dst_ip = Some("192.0.2.255".parse().unwrap());
    /// meta.local_ip = Some("192.0.2.10".parse().unwrap());
    /// assert!(meta.is_group_addressed());
    ///
    /// meta.dst_ip = Some("192.0.2.10".parse().unwrap());
    /// assert!(!meta.is_group_addressed(), "sent to this host alone");
    /// ```
    pub fn is_group_addressed(&self) -> bool {
        let Some(dst) = self.dst_ip.map(|ip| ip.to_canonical()) else {
            return false;
        };
        // For IPv4 the system answers a datagram sent to one of its own
        // addresses from that address: a different local address means the
        // destination was a (subnet) broadcast address.
        !is_unicast(dst)
            || (dst.is_ipv4()
                && self
                    .local_ip
                    .is_some_and(|local| local.to_canonical() != dst))
    }
}

/// Whether `ip` names one host: not unspecified, not the IPv4 limited
/// broadcast address, not multicast (IPv4-mapped IPv6 addresses are judged
/// as the IPv4 address they carry). Only such an address may be a reply's
/// destination or source. A subnet broadcast address (`10.0.0.255` on a
/// /24) cannot be told from its address alone; see
/// [`RecvMeta::is_group_addressed`].
///
/// ```
/// use abyss_transport::is_unicast;
///
/// assert!(is_unicast("192.0.2.1".parse().unwrap()));
/// assert!(is_unicast("::ffff:192.0.2.1".parse().unwrap()));
/// for other in ["0.0.0.0", "255.255.255.255", "224.0.0.251", "::", "ff02::fb", "::ffff:255.255.255.255"] {
///     assert!(!is_unicast(other.parse().unwrap()), "{other}");
/// }
/// ```
pub fn is_unicast(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => !(v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast()),
        IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_multicast()),
    }
}

/// One datagram (or, with [`segment_size`](Transmit::segment_size), a run of
/// equal-sized datagrams to one destination) for [`Transport::poll_send`].
///
/// # Example
///
/// ```
/// use abyss_transport::Transmit;
///
/// let peer = "192.0.2.1:5000".parse().unwrap();
/// // One datagram, answered from the address the request was sent to.
/// let reply = Transmit::new(peer, b"pong").with_src_ip(Some("192.0.2.10".parse().unwrap()));
/// assert_eq!(reply.contents, b"pong");
///
/// // Three datagrams of 1200, 1200 and 100 bytes in one GSO transmit (for a
/// // transport whose `max_transmit_segments()` is at least 3).
/// let payload = vec![0u8; 2500];
/// let mut run = Transmit::new(peer, &payload);
/// run.segment_size = Some(1200);
/// assert_eq!(run.contents.chunks(1200).count(), 3);
/// ```
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
    /// The TOS (IPv4) or traffic class (IPv6) byte to send with, DSCP and
    /// ECN (Linux `IP_TOS` / `IPV6_TCLASS`). `None` keeps the socket's.
    pub tos: Option<u8>,
}

impl<'a> Transmit<'a> {
    /// One datagram to `destination`, from whatever source the system picks.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::Transmit;
    ///
    /// let transmit = Transmit::new("192.0.2.1:53".parse().unwrap(), b"answer");
    /// assert_eq!(transmit.src_ip, None);
    /// assert_eq!(transmit.segment_size, None);
    /// ```
    pub fn new(destination: SocketAddr, contents: &'a [u8]) -> Self {
        Self {
            destination,
            contents,
            src_ip: None,
            segment_size: None,
            tos: None,
        }
    }

    /// Sends with `tos` as its TOS or traffic class byte (DSCP and ECN).
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::Transmit;
    ///
    /// // DSCP EF (46), for a latency-sensitive reply.
    /// let reply = Transmit::new("192.0.2.1:5004".parse().unwrap(), b"voice").with_tos(Some(46 << 2));
    /// assert_eq!(reply.tos, Some(0xb8));
    /// ```
    #[must_use]
    pub fn with_tos(mut self, tos: Option<u8>) -> Self {
        self.tos = tos;
        self
    }

    /// Sends from `src_ip` (for example the address a request was sent to).
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::{RecvMeta, Transmit};
    ///
    /// // A request that came to 192.0.2.10 on a socket bound to 0.0.0.0.
    /// let mut request = RecvMeta::new("198.51.100.7:5000".parse().unwrap(), 4);
    /// request.local_ip = Some("192.0.2.10".parse().unwrap());
    ///
    /// let reply = Transmit::new(request.peer, b"pong").with_src_ip(request.local_ip);
    /// assert_eq!(reply.src_ip, request.local_ip);
    /// ```
    #[must_use]
    pub fn with_src_ip(mut self, src_ip: Option<IpAddr>) -> Self {
        self.src_ip = src_ip;
        self
    }
}
