//! Socket set-up shared by every unix, per-socket receive state, and the
//! one-datagram-per-call `recvmsg`/`sendmsg` path (through nix) used where
//! `recvmmsg`/`sendmmsg` are not available.

use std::io;
use std::net::SocketAddr;

/// Per-socket state of the one-datagram path: an error met after part of a
/// batch was filled, reported on the next call (`recvmmsg` reports such
/// errors itself).
#[cfg(not(any(target_os = "linux", target_os = "android")))]
#[derive(Debug, Default)]
pub(super) struct State {
    deferred: std::sync::Mutex<Option<io::Error>>,
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
impl State {
    pub(super) fn defer_error(&self, error: io::Error) {
        *self.deferred.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
    }

    pub(super) fn take_deferred_error(&self) -> Option<io::Error> {
        self.deferred
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

/// How many datagrams one buffer may carry each way (GRO and GSO).
#[derive(Debug, Clone, Copy)]
pub(super) struct Segments {
    pub(super) receive: usize,
    pub(super) transmit: usize,
}

impl Segments {
    /// Turns on GRO if asked, and probes GSO the way quinn-udp does (setting
    /// `UDP_SEGMENT` to 0 succeeds only where the kernel supports it).
    #[cfg(any(target_os = "linux", target_os = "android"))]
    pub(super) fn enable(socket: &socket2::Socket, gro: bool, gso: bool) -> Self {
        use nix::sys::socket::{setsockopt, sockopt};
        let receive = if gro && setsockopt(socket, sockopt::UdpGroSegment, &true).is_ok() {
            64
        } else {
            1
        };
        let transmit = if gso && setsockopt(socket, sockopt::UdpGsoSegment, &0).is_ok() {
            64
        } else {
            1
        };
        Self { receive, transmit }
    }

    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    pub(super) fn enable(_socket: &socket2::Socket, _gro: bool, _gso: bool) -> Self {
        Self {
            receive: 1,
            transmit: 1,
        }
    }
}

/// Asks the kernel for the destination address of each datagram.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(super) fn enable_metadata(socket: &socket2::Socket, addr: SocketAddr) -> io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    if addr.is_ipv4() {
        setsockopt(socket, sockopt::Ipv4PacketInfo, &true)?;
    } else {
        setsockopt(socket, sockopt::Ipv6RecvPacketInfo, &true)?;
        // A dual-stack socket reports IPv4 destinations with IP_PKTINFO; an
        // IPv6-only socket refuses the option, which is fine.
        let _ = setsockopt(socket, sockopt::Ipv4PacketInfo, &true);
    }
    Ok(())
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub(super) fn enable_metadata(_socket: &socket2::Socket, _addr: SocketAddr) -> io::Result<()> {
    Ok(())
}

/// Asks the kernel for each datagram's arrival time and TOS byte, when
/// the options want them.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(super) fn enable_extra_metadata(
    socket: &socket2::Socket,
    addr: SocketAddr,
    timestamps: bool,
    tos: bool,
) -> io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    if timestamps {
        setsockopt(socket, sockopt::ReceiveTimestampns, &true)?;
    }
    if tos {
        if addr.is_ipv4() {
            setsockopt(socket, sockopt::IpRecvTos, &true)?;
        } else {
            setsockopt(socket, sockopt::Ipv6RecvTClass, &true)?;
            // IPv4 datagrams on a dual-stack socket.
            let _ = setsockopt(socket, sockopt::IpRecvTos, &true);
        }
    }
    Ok(())
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub(super) fn enable_extra_metadata(
    _socket: &socket2::Socket,
    _addr: SocketAddr,
    _timestamps: bool,
    _tos: bool,
) -> io::Result<()> {
    Ok(())
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub(super) use plain::{recv, send};

/// One datagram per system call, without destination addresses.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
mod plain {
    use std::io::{self, IoSlice, IoSliceMut};
    use std::net::SocketAddr;
    use std::os::fd::AsRawFd;

    use nix::sys::socket::{MsgFlags, SockaddrStorage, recvmsg, sendmsg};

    use super::State;
    use crate::{RecvMeta, Transmit};

    /// Receives one datagram with `recvmsg`, flagging truncation.
    pub(in super::super) fn recv(
        socket: &impl AsRawFd,
        _state: &State,
        buf: &mut IoSliceMut<'_>,
        meta: &mut RecvMeta,
    ) -> io::Result<()> {
        let msg = recvmsg::<SockaddrStorage>(
            socket.as_raw_fd(),
            std::slice::from_mut(buf),
            None,
            MsgFlags::empty(),
        )?;
        let peer = msg
            .address
            .as_ref()
            .and_then(to_socket_addr)
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, "datagram without a source")
            })?;
        *meta = RecvMeta::new(peer, msg.bytes);
        meta.truncated = msg.flags.contains(MsgFlags::MSG_TRUNC);
        Ok(())
    }

    /// Sends one datagram with `sendmsg`; the source address is the
    /// system's choice.
    pub(in super::super) fn send(
        socket: &impl AsRawFd,
        _local: SocketAddr,
        transmit: &Transmit<'_>,
    ) -> io::Result<()> {
        let destination = SockaddrStorage::from(transmit.destination);
        let iov = [IoSlice::new(transmit.contents)];
        sendmsg(
            socket.as_raw_fd(),
            &iov,
            &[],
            MsgFlags::empty(),
            Some(&destination),
        )
        .map(drop)
        .map_err(io::Error::from)
    }

    fn to_socket_addr(addr: &SockaddrStorage) -> Option<SocketAddr> {
        if let Some(v4) = addr.as_sockaddr_in() {
            return Some(SocketAddr::V4((*v4).into()));
        }
        addr.as_sockaddr_in6()
            .map(|v6| SocketAddr::V6((*v6).into()))
    }
}
