//! Sockets bound elsewhere: by a supervisor, by the process itself before
//! it dropped its privileges, or by systemd (socket activation).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crate::{Bind, Transport, UdpOptions, UdpTransport};

/// Datagram sockets that were bound elsewhere, served as they are.
///
/// A server given these serves one listener per socket. They are used
/// once: after a suspend, or to replace a listener that failed, the server
/// binds fresh sockets on the same address with the fallback
/// [`UdpOptions`], which works when the address is free to this process
/// (an unprivileged port, or the capability to bind it) and, to join
/// sockets still open, when they have `SO_REUSEPORT` (systemd:
/// `ReusePort=yes`).
///
/// # Example
///
/// ```
/// use abyss_transport::{Bind, BoundSockets};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> std::io::Result<()> {
/// // Bound while the process could (a privileged port, say).
/// let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
/// let addr = socket.local_addr()?;
/// let sockets = BoundSockets::new(vec![socket])?;
/// assert_eq!(sockets.local_addr(), addr);
///
/// let group = sockets.bind_group(addr, 1)?;
/// assert_eq!(group[0].local_addr()?, addr);
/// # Ok(())
/// # }
/// ```
pub struct BoundSockets {
    addr: SocketAddr,
    count: usize,
    sockets: Mutex<Vec<std::net::UdpSocket>>,
    fallback: UdpOptions,
}

impl fmt::Debug for BoundSockets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoundSockets")
            .field("addr", &self.addr)
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

impl BoundSockets {
    /// Serves `sockets`, which must be bound to one address (a group of
    /// `SO_REUSEPORT` sockets, or one socket).
    ///
    /// # Errors
    ///
    /// `InvalidInput` when `sockets` is empty or its addresses differ.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::BoundSockets;
    ///
    /// let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    /// let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    /// let error = BoundSockets::new(vec![a, b]).unwrap_err();
    /// assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput);
    /// assert!(BoundSockets::new(Vec::new()).is_err());
    /// ```
    pub fn new(sockets: Vec<std::net::UdpSocket>) -> io::Result<Self> {
        let invalid = |why: String| io::Error::new(io::ErrorKind::InvalidInput, why);
        let first = sockets
            .first()
            .ok_or_else(|| invalid("no socket to serve".to_owned()))?;
        let addr = first.local_addr()?;
        for socket in &sockets[1..] {
            let other = socket.local_addr()?;
            if other != addr {
                return Err(invalid(format!(
                    "the sockets are bound to different addresses: {addr} and {other}"
                )));
            }
        }
        Ok(Self {
            addr,
            count: sockets.len(),
            sockets: Mutex::new(sockets),
            fallback: UdpOptions::new(),
        })
    }

    /// The datagram sockets systemd passed to this process (socket
    /// activation: `LISTEN_PID`, `LISTEN_FDS`), or `None` when it passed
    /// none, or they were taken already (by an earlier call). They are
    /// marked close-on-exec, so programs this one starts do not inherit
    /// them.
    ///
    /// # Errors
    ///
    /// `InvalidInput` when a passed descriptor is not a datagram socket
    /// (a `ListenStream=` unit, say), or the sockets are bound to
    /// different addresses (serve one `ListenDatagram=` per server).
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::BoundSockets;
    ///
    /// // Run as `systemd-socket-activate --datagram -l 127.0.0.1:5353 PROGRAM`
    /// // to get one; run directly, there is none.
    /// match BoundSockets::from_systemd()? {
    ///     Some(sockets) => println!("serving {} from systemd", sockets.local_addr()),
    ///     None => println!("not socket-activated"),
    /// }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    #[cfg(unix)]
    pub fn from_systemd() -> io::Result<Option<Self>> {
        let sockets = systemd::take()?;
        if sockets.is_empty() {
            return Ok(None);
        }
        Self::new(sockets).map(Some)
    }

    /// Receives the sockets a running server hands over on `stream` (its
    /// end of a Unix stream connection; see `ServerHandle::hand_over` in
    /// `abyss`): a process taking over a port starts serving the very
    /// sockets its predecessor reads, so no datagram finds the port without
    /// a reader. Blocks until they come.
    ///
    /// # Errors
    ///
    /// Whatever the stream reports; `InvalidData` when what came is not a
    /// set of datagram sockets bound to one address.
    ///
    /// # Example
    ///
    /// ```
    /// use std::os::fd::AsFd;
    /// use std::os::unix::net::UnixStream;
    /// use abyss_transport::BoundSockets;
    ///
    /// let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    /// let (ours, theirs) = UnixStream::pair()?;
    /// BoundSockets::send(&ours, &[socket.as_fd()])?;
    /// let received = BoundSockets::receive(&theirs)?;
    /// assert_eq!(received.local_addr(), socket.local_addr()?);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    #[cfg(unix)]
    pub fn receive(stream: &std::os::unix::net::UnixStream) -> io::Result<Self> {
        let sockets = passing::receive(stream)?;
        Self::new(sockets).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Sends `sockets` on `stream`, for [`receive`](Self::receive) at the
    /// other end (the descriptors are duplicated into the receiving
    /// process: both share the sockets until one closes its copies).
    ///
    /// # Example
    ///
    /// See [`receive`](Self::receive).
    #[cfg(unix)]
    pub fn send(
        stream: &std::os::unix::net::UnixStream,
        sockets: &[std::os::fd::BorrowedFd<'_>],
    ) -> io::Result<()> {
        passing::send(stream, sockets)
    }

    /// Options for the sockets bound later on the same address (after a
    /// suspend, or to replace a failed listener). Default: `UdpOptions::new()`.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::{BoundSockets, UdpOptions};
    ///
    /// let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    /// let sockets = BoundSockets::new(vec![socket])
    ///     .unwrap()
    ///     .fallback(UdpOptions::new().recv_buffer_size(1 << 20));
    /// # let _ = sockets;
    /// ```
    pub fn fallback(mut self, options: UdpOptions) -> Self {
        self.fallback = options;
        self
    }

    /// The address the sockets are bound to.
    ///
    /// # Example
    ///
    /// See [`BoundSockets`].
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many sockets were given: the server serves each with a listener
    /// of its own.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::BoundSockets;
    ///
    /// let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    /// assert_eq!(BoundSockets::new(vec![socket]).unwrap().len(), 1);
    /// ```
    pub fn len(&self) -> usize {
        self.count
    }

    /// Never: there is at least one socket.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::BoundSockets;
    ///
    /// let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    /// assert!(!BoundSockets::new(vec![socket]).unwrap().is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

impl Bind for BoundSockets {
    /// The given sockets the first time, if `addr` is theirs and `count`
    /// uses them all; then fresh ones, from the fallback options.
    fn bind_group(&self, addr: SocketAddr, count: usize) -> io::Result<Vec<Arc<dyn Transport>>> {
        let mut held = self.sockets.lock().unwrap_or_else(|e| e.into_inner());
        if held.is_empty() {
            drop(held);
            return self.fallback.bind_group(addr, count);
        }
        if addr != self.addr || count != held.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} sockets bound to {} were given: serve them with as many listeners on that address (asked: {count} on {addr})",
                    held.len(),
                    self.addr
                ),
            ));
        }
        held.drain(..)
            .map(|socket| Ok(Arc::new(UdpTransport::from_std(socket)?) as Arc<dyn Transport>))
            .collect()
    }

    fn join_group(&self, addr: SocketAddr) -> io::Result<Arc<dyn Transport>> {
        self.fallback.join_group(addr)
    }
}

#[cfg(unix)]
mod systemd {
    #![allow(unsafe_code)]

    use std::io;
    use std::os::fd::{BorrowedFd, FromRawFd, RawFd};
    use std::sync::atomic::{AtomicBool, Ordering};

    /// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
    const FIRST: RawFd = 3;

    /// Takes the sockets systemd passed, if `LISTEN_PID` is this process
    /// and they have not been taken yet.
    pub(super) fn take() -> io::Result<Vec<std::net::UdpSocket>> {
        static TAKEN: AtomicBool = AtomicBool::new(false);
        let pid = std::env::var("LISTEN_PID").ok();
        let ours = pid.and_then(|pid| pid.parse::<u32>().ok()) == Some(std::process::id());
        if !ours || TAKEN.swap(true, Ordering::AcqRel) {
            return Ok(Vec::new());
        }
        let count: RawFd = std::env::var("LISTEN_FDS")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let mut sockets = Vec::new();
        for fd in FIRST..FIRST.saturating_add(count) {
            // SAFETY: systemd passed `fd` to this process (LISTEN_PID is
            // ours) and this is the one time it is taken (TAKEN); it is
            // only borrowed here, to ask what it is.
            let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
            let socket = socket2::SockRef::from(&borrowed);
            if socket.r#type()? != socket2::Type::DGRAM {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("descriptor {fd} from systemd is not a datagram socket"),
                ));
            }
            socket.set_cloexec(true)?;
            // SAFETY: as above; from here the socket owns the descriptor.
            sockets.push(unsafe { std::net::UdpSocket::from_raw_fd(fd) });
        }
        Ok(sockets)
    }
}

/// Passing socket descriptors over a Unix stream (`SCM_RIGHTS`).
#[cfg(unix)]
mod passing {
    #![allow(unsafe_code)]

    use std::io::{self, IoSlice, IoSliceMut};
    use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, RawFd};
    use std::os::unix::net::UnixStream;

    use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

    /// Descriptors passed at most in one handover (listeners of a group).
    const MAX: usize = 256;

    pub(super) fn send(stream: &UnixStream, sockets: &[BorrowedFd<'_>]) -> io::Result<()> {
        if sockets.is_empty() || sockets.len() > MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "1 to {MAX} sockets can be handed over, not {}",
                    sockets.len()
                ),
            ));
        }
        let fds: Vec<RawFd> = sockets.iter().map(AsRawFd::as_raw_fd).collect();
        // One byte of data carries the descriptors: its count.
        let count = [u8::try_from(fds.len() - 1).unwrap_or(u8::MAX)];
        let data = [IoSlice::new(&count)];
        sendmsg::<()>(
            stream.as_raw_fd(),
            &data,
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )?;
        Ok(())
    }

    pub(super) fn receive(stream: &UnixStream) -> io::Result<Vec<std::net::UdpSocket>> {
        let mut count = [0u8; 1];
        let mut data = [IoSliceMut::new(&mut count)];
        let mut space = nix::cmsg_space!([RawFd; MAX]);
        let message = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut data,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let mut fds = Vec::new();
        for control in message.cmsgs()? {
            if let ControlMessageOwned::ScmRights(passed) = control {
                fds.extend(passed);
            }
        }
        // SAFETY: the kernel installed these descriptors in this process
        // for this message; nothing else owns them.
        let owned: Vec<std::os::fd::OwnedFd> = fds
            .into_iter()
            .map(|fd| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
            .collect();
        if message.bytes == 0 || owned.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the stream closed before any socket came",
            ));
        }
        let mut sockets = Vec::with_capacity(owned.len());
        for fd in owned {
            let kind = socket2::SockRef::from(&fd).r#type()?;
            if kind != socket2::Type::DGRAM {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a descriptor handed over is not a datagram socket",
                ));
            }
            sockets.push(std::net::UdpSocket::from(fd));
        }
        Ok(sockets)
    }
}
