//! `recvmsg`/`sendmsg` through nix: truncation flag, destination address
//! (Linux `IP_PKTINFO` / `IPV6_RECVPKTINFO`), source address on send, and the
//! kernel drop counter (Linux `SO_RXQ_OVFL`).

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Mutex;
#[cfg(any(target_os = "linux", target_os = "android"))]
use std::sync::atomic::{AtomicU64, Ordering};

use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg, sendmsg,
};

use crate::RecvMeta;
use crate::Transmit;

/// Room for the control messages we ask for: `in6_pktinfo`, `in_pktinfo`
/// (dual-stack sockets can get either) and the drop counter, with headers.
/// `align(8)` keeps the buffer aligned for `cmsghdr`.
#[repr(C, align(8))]
struct ControlBuffer([u8; 128]);

/// Per-socket state shared by receive calls.
#[derive(Debug)]
pub(super) struct State {
    /// The kernel's drop counter as carried by the last datagram received.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    drops: AtomicU64,
    /// An error met after part of a batch was filled, reported next call.
    deferred: Mutex<Option<io::Error>>,
}

impl State {
    pub(super) fn new() -> Self {
        Self {
            #[cfg(any(target_os = "linux", target_os = "android"))]
            drops: AtomicU64::new(0),
            deferred: Mutex::new(None),
        }
    }

    pub(super) fn defer_error(&self, error: io::Error) {
        *self.deferred.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
    }

    pub(super) fn take_deferred_error(&self) -> Option<io::Error> {
        self.deferred
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    #[cfg(any(target_os = "linux", target_os = "android"))]
    pub(super) fn kernel_drops(&self) -> Option<u64> {
        Some(self.drops.load(Ordering::Relaxed))
    }

    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    pub(super) fn kernel_drops(&self) -> Option<u64> {
        None
    }
}

/// Asks the kernel for the destination address and the drop counter.
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
    setsockopt(socket, sockopt::RxqOvfl, &1)?;
    Ok(())
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub(super) fn enable_metadata(_socket: &socket2::Socket, _addr: SocketAddr) -> io::Result<()> {
    Ok(())
}

/// Receives one datagram with `recvmsg`.
pub(super) fn recv(
    socket: &impl AsRawFd,
    state: &State,
    buf: &mut IoSliceMut<'_>,
    meta: &mut RecvMeta,
) -> io::Result<()> {
    let mut control = ControlBuffer([0; 128]);
    let msg = recvmsg::<SockaddrStorage>(
        socket.as_raw_fd(),
        std::slice::from_mut(buf),
        Some(&mut control.0),
        MsgFlags::empty(),
    )?;
    let peer = msg
        .address
        .as_ref()
        .and_then(to_socket_addr)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "datagram without a source"))?;
    *meta = RecvMeta::new(peer, msg.bytes);
    meta.truncated = msg.flags.contains(MsgFlags::MSG_TRUNC);
    // A truncated control buffer only loses metadata, never the datagram.
    if let Ok(cmsgs) = msg.cmsgs() {
        for cmsg in cmsgs {
            read_control(cmsg, state, meta);
        }
    }
    Ok(())
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn read_control(cmsg: ControlMessageOwned, state: &State, meta: &mut RecvMeta) {
    match cmsg {
        ControlMessageOwned::Ipv4PacketInfo(info) => {
            meta.dst_ip = Some(IpAddr::from(info.ipi_addr.s_addr.to_ne_bytes()));
        }
        ControlMessageOwned::Ipv6PacketInfo(info) => {
            meta.dst_ip = Some(IpAddr::from(info.ipi6_addr.s6_addr));
        }
        ControlMessageOwned::RxqOvfl(drops) => {
            state.drops.store(u64::from(drops), Ordering::Relaxed);
        }
        _ => {}
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn read_control(_cmsg: ControlMessageOwned, _state: &State, _meta: &mut RecvMeta) {}

/// Sends one datagram with `sendmsg`, from `transmit.src_ip` when the socket
/// is bound to a wildcard address and the system supports choosing it.
pub(super) fn send(
    socket: &impl AsRawFd,
    local: SocketAddr,
    transmit: &Transmit<'_>,
) -> io::Result<()> {
    let destination = SockaddrStorage::from(transmit.destination);
    let iov = [IoSlice::new(transmit.contents)];
    let fd = socket.as_raw_fd();
    let source = transmit
        .src_ip
        .filter(|ip| local.ip().is_unspecified() && super::usable_source(*ip));
    match source {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        Some(src) => send_from(fd, &iov, &destination, local, src),
        _ => sendmsg(fd, &iov, &[], MsgFlags::empty(), Some(&destination))
            .map(drop)
            .map_err(io::Error::from),
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn send_from(
    fd: std::os::fd::RawFd,
    iov: &[IoSlice<'_>],
    destination: &SockaddrStorage,
    local: SocketAddr,
    src: IpAddr,
) -> io::Result<()> {
    let flags = MsgFlags::empty();
    let sent = match (local, src) {
        (SocketAddr::V4(_), IpAddr::V4(ip)) => {
            let info = libc::in_pktinfo {
                ipi_ifindex: 0,
                ipi_spec_dst: libc::in_addr {
                    s_addr: u32::from_ne_bytes(ip.octets()),
                },
                ipi_addr: libc::in_addr { s_addr: 0 },
            };
            sendmsg(
                fd,
                iov,
                &[ControlMessage::Ipv4PacketInfo(&info)],
                flags,
                Some(destination),
            )
        }
        (SocketAddr::V6(_), ip) => {
            let ip = match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            let info = libc::in6_pktinfo {
                ipi6_addr: libc::in6_addr {
                    s6_addr: ip.octets(),
                },
                ipi6_ifindex: 0,
            };
            sendmsg(
                fd,
                iov,
                &[ControlMessage::Ipv6PacketInfo(&info)],
                flags,
                Some(destination),
            )
        }
        // An IPv4 socket cannot send from an IPv6 address: let the system pick.
        (SocketAddr::V4(_), IpAddr::V6(_)) => sendmsg(fd, iov, &[], flags, Some(destination)),
    };
    sent.map(drop).map_err(io::Error::from)
}

fn to_socket_addr(addr: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    addr.as_sockaddr_in6()
        .map(|v6| SocketAddr::V6((*v6).into()))
}
