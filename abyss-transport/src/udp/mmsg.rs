//! Batched `recvmmsg`/`sendmmsg` on Linux, with the metadata the plain path
//! reads (truncation, destination address, GRO segment size), source
//! addresses and GSO segment sizes on send, and the kernel's drop counter
//! (`SO_MEMINFO`).
//!
//! This is the one module of the project with `unsafe` code: the message
//! headers point into buffers on this function's stack. No well-kept crate
//! covers it: quinn-udp's `recvmmsg` path does not report `MSG_TRUNC` and it
//! has no `sendmmsg`; nix's reusable `MultiHeaders` is not `Send` and keeps
//! the control and name lengths the kernel shrank on the previous call.
//! Every header is built afresh on the stack for each call, so nothing is
//! allocated.
#![allow(unsafe_code)]

use std::io::{self, IoSliceMut};
use std::mem::{self, MaybeUninit};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;
use std::ptr;

use super::BATCH;
use crate::{RecvMeta, Transmit};

/// Control space per message: `in6_pktinfo` (20 bytes) and `in_pktinfo`
/// (12) and the GRO segment size (4), each behind a 16-byte header, rounded
/// up.
const CONTROL: usize = 160;

#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct Control([MaybeUninit<u8>; CONTROL]);

/// Receives up to `min(bufs, meta, BATCH)` datagrams with one `recvmmsg`.
pub(super) fn recv(
    fd: RawFd,
    bufs: &mut [IoSliceMut<'_>],
    meta: &mut [RecvMeta],
) -> io::Result<usize> {
    let count = bufs.len().min(meta.len()).min(BATCH);
    let mut names = [MaybeUninit::<libc::sockaddr_storage>::uninit(); BATCH];
    let mut controls = [Control([MaybeUninit::uninit(); CONTROL]); BATCH];
    // SAFETY: `mmsghdr` is a plain C struct of integers and pointers, for
    // which all-zero bytes are a valid (empty) value.
    let mut headers: [libc::mmsghdr; BATCH] = unsafe { mem::zeroed() };
    for i in 0..count {
        let header = &mut headers[i].msg_hdr;
        header.msg_name = names[i].as_mut_ptr().cast();
        header.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // `IoSliceMut` is guaranteed ABI-compatible with `iovec` on unix.
        header.msg_iov = (&mut bufs[i] as *mut IoSliceMut<'_>).cast::<libc::iovec>();
        header.msg_iovlen = 1;
        header.msg_control = controls[i].0.as_mut_ptr().cast();
        header.msg_controllen = CONTROL as _;
    }
    // SAFETY: the first `count` headers point at live buffers (`names`,
    // `controls`, and the caller's `bufs`) with their true sizes, and all of
    // them outlive the call. `count <= BATCH`.
    let received = unsafe {
        libc::recvmmsg(
            fd,
            headers.as_mut_ptr(),
            count as libc::c_uint,
            0,
            ptr::null_mut(),
        )
    };
    if received < 0 {
        return Err(io::Error::last_os_error());
    }
    let received = received as usize;
    for i in 0..received {
        let header = &headers[i].msg_hdr;
        // SAFETY: the kernel wrote the source address of message `i`, and
        // its length in `msg_namelen`, for every message it returned.
        let peer =
            unsafe { decode_address(names[i].as_ptr(), header.msg_namelen) }.ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "datagram from an unknown address family",
                )
            })?;
        let mut m = RecvMeta::new(peer, headers[i].msg_len as usize);
        m.truncated = header.msg_flags & libc::MSG_TRUNC != 0;
        // A truncated control buffer (MSG_CTRUNC) loses metadata, never data;
        // the messages that did fit are still read.
        // SAFETY: `header` is a header the kernel filled in; its control
        // pointer and (updated) length describe `controls[i]`.
        unsafe { decode_control(header, &mut m) };
        meta[i] = m;
    }
    Ok(received)
}

/// Reads the destination address and GRO segment size from a received
/// header.
///
/// # Safety
///
/// `header` must be a `msghdr` filled in by `recvmsg`/`recvmmsg`, whose
/// `msg_control`/`msg_controllen` describe valid memory.
unsafe fn decode_control(header: &libc::msghdr, meta: &mut RecvMeta) {
    // SAFETY: guaranteed by the caller; CMSG_FIRSTHDR/CMSG_NXTHDR stay within
    // `msg_controllen` and return null past the end.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(header) };
    while !cmsg.is_null() {
        // SAFETY: a non-null pointer from CMSG_FIRSTHDR/NXTHDR points at a
        // whole header inside the control buffer.
        let (level, kind) = unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type) };
        // SAFETY: CMSG_DATA points at the payload of this header, whose size
        // the kernel sets by (level, type); reads are unaligned-safe.
        let data = unsafe { libc::CMSG_DATA(cmsg) };
        match (level, kind) {
            (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
                // SAFETY: an IP_PKTINFO payload is an `in_pktinfo`.
                let info = unsafe { ptr::read_unaligned(data.cast::<libc::in_pktinfo>()) };
                meta.dst_ip = Some(IpAddr::V4(Ipv4Addr::from(
                    info.ipi_addr.s_addr.to_ne_bytes(),
                )));
                // The local address the kernel would answer from: the
                // interface's own address for a broadcast destination.
                meta.local_ip = Some(IpAddr::V4(Ipv4Addr::from(
                    info.ipi_spec_dst.s_addr.to_ne_bytes(),
                )));
                meta.interface = u32::try_from(info.ipi_ifindex).ok().filter(|&i| i != 0);
            }
            (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                // SAFETY: an IPV6_PKTINFO payload is an `in6_pktinfo`.
                let info = unsafe { ptr::read_unaligned(data.cast::<libc::in6_pktinfo>()) };
                let dst = IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr));
                meta.dst_ip = Some(dst);
                // IPv6 has no broadcast: the local address is the
                // destination (a multicast one is no source: whoever replies
                // checks with `is_unicast`).
                meta.local_ip = Some(dst);
                meta.interface = Some(info.ipi6_ifindex).filter(|&i| i != 0);
            }
            (libc::IPPROTO_IP, libc::IP_TOS) => {
                // SAFETY: an IP_TOS payload on receive is one byte.
                meta.tos = Some(unsafe { ptr::read_unaligned(data) });
            }
            (libc::IPPROTO_IPV6, libc::IPV6_TCLASS) => {
                // SAFETY: an IPV6_TCLASS payload is an `int`.
                let class = unsafe { ptr::read_unaligned(data.cast::<libc::c_int>()) };
                meta.tos = u8::try_from(class).ok();
            }
            (libc::SOL_SOCKET, libc::SCM_TIMESTAMPNS) => {
                // SAFETY: an SCM_TIMESTAMPNS payload is a `timespec`.
                let at = unsafe { ptr::read_unaligned(data.cast::<libc::timespec>()) };
                if let (Ok(secs), Ok(nanos)) = (u64::try_from(at.tv_sec), u32::try_from(at.tv_nsec))
                {
                    meta.timestamp = std::time::UNIX_EPOCH
                        .checked_add(std::time::Duration::new(secs, nanos.min(999_999_999)));
                }
            }
            (libc::SOL_UDP, libc::UDP_GRO) => {
                // SAFETY: a UDP_GRO payload is the segment size, an `int`.
                let stride = unsafe { ptr::read_unaligned(data.cast::<libc::c_int>()) };
                if stride > 0 {
                    meta.stride = stride as usize;
                }
            }
            _ => {}
        }
        // SAFETY: as above; `cmsg` is a header of this message.
        cmsg = unsafe { libc::CMSG_NXTHDR(header, cmsg) };
    }
}

/// A socket address as the kernel wrote it.
///
/// # Safety
///
/// `name` must point at `len` initialised bytes of a `sockaddr`.
unsafe fn decode_address(
    name: *const libc::sockaddr_storage,
    len: libc::socklen_t,
) -> Option<SocketAddr> {
    let len = len as usize;
    // SAFETY: `ss_family` is the first field and always written.
    match unsafe { (*name).ss_family } as libc::c_int {
        libc::AF_INET if len >= mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: an AF_INET address of this length is a `sockaddr_in`.
            let addr = unsafe { ptr::read_unaligned(name.cast::<libc::sockaddr_in>()) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(addr.sin_addr.s_addr.to_ne_bytes()),
                u16::from_be(addr.sin_port),
            )))
        }
        libc::AF_INET6 if len >= mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: an AF_INET6 address of this length is a `sockaddr_in6`.
            let addr = unsafe { ptr::read_unaligned(name.cast::<libc::sockaddr_in6>()) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(addr.sin6_addr.s6_addr),
                u16::from_be(addr.sin6_port),
                addr.sin6_flowinfo,
                addr.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Writes `addr` as a `sockaddr` for a socket of `local`'s family, returning
/// its length.
fn encode_address(
    addr: SocketAddr,
    local: SocketAddr,
    out: &mut libc::sockaddr_storage,
) -> libc::socklen_t {
    // An IPv6 socket reaches IPv4 peers through mapped addresses.
    let addr = match (addr, local) {
        (SocketAddr::V4(v4), SocketAddr::V6(_)) => {
            SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
        }
        _ => addr,
    };
    match addr {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: `sockaddr_storage` is larger than and aligned for any
            // `sockaddr_*`.
            unsafe { ptr::write((out as *mut libc::sockaddr_storage).cast(), sin) };
            mem::size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: as above.
            unsafe { ptr::write((out as *mut libc::sockaddr_storage).cast(), sin6) };
            mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

/// Sends up to `BATCH` transmits with one `sendmmsg`, returning how many
/// went out. The source address of a transmit is used when the socket is
/// bound to a wildcard address.
pub(super) fn send(fd: RawFd, local: SocketAddr, transmits: &[Transmit<'_>]) -> io::Result<usize> {
    let count = transmits.len().min(BATCH);
    // SAFETY: all-zero bytes are a valid value of these plain C structs.
    let mut names: [libc::sockaddr_storage; BATCH] = unsafe { mem::zeroed() };
    let mut iovecs: [libc::iovec; BATCH] = unsafe { mem::zeroed() };
    let mut headers: [libc::mmsghdr; BATCH] = unsafe { mem::zeroed() };
    let mut controls = [Control([MaybeUninit::new(0); CONTROL]); BATCH];
    let wildcard = local.ip().is_unspecified();
    for (i, transmit) in transmits.iter().take(count).enumerate() {
        let name_len = encode_address(transmit.destination, local, &mut names[i]);
        iovecs[i] = libc::iovec {
            iov_base: transmit.contents.as_ptr() as *mut libc::c_void,
            iov_len: transmit.contents.len(),
        };
        let header = &mut headers[i].msg_hdr;
        header.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
        header.msg_namelen = name_len;
        header.msg_iov = &mut iovecs[i];
        header.msg_iovlen = 1;
        header.msg_control = controls[i].0.as_mut_ptr().cast();
        header.msg_controllen = CONTROL as _;
        let source = transmit
            .src_ip
            .filter(|ip| wildcard && crate::is_unicast(*ip));
        // SAFETY: `header` points at `controls[i]`, CONTROL bytes long and
        // 8-byte aligned, enough for both messages written there.
        let used = unsafe {
            encode_control(
                header,
                local,
                source,
                transmit.segment_size,
                transmit.tos,
                transmit.destination,
            )
        };
        header.msg_controllen = used as _;
        if used == 0 {
            header.msg_control = ptr::null_mut();
        }
    }
    // SAFETY: the first `count` headers point at live `names`, `iovecs`,
    // `controls` and the transmits' contents, which outlive the call; the
    // kernel only reads from them. `count <= BATCH`.
    let sent = unsafe { libc::sendmmsg(fd, headers.as_mut_ptr(), count as libc::c_uint, 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sent as usize)
}

/// Writes the source-address, GSO and TOS control messages, returning the bytes
/// used.
///
/// # Safety
///
/// `header.msg_control` must point at `header.msg_controllen` writable,
/// 8-byte-aligned bytes, enough for both messages.
unsafe fn encode_control(
    header: &mut libc::msghdr,
    local: SocketAddr,
    source: Option<IpAddr>,
    segment_size: Option<usize>,
    tos: Option<u8>,
    destination: SocketAddr,
) -> usize {
    // (level, type, payload bytes, payload length)
    let mut items = [(0, 0, [0u8; 20], 0usize); 3];
    let mut count = 0;
    if let Some(ip) = source {
        let item = match (local, ip) {
            (SocketAddr::V4(_), IpAddr::V4(v4)) => {
                let info = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from_ne_bytes(v4.octets()),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                Some((libc::IPPROTO_IP, libc::IP_PKTINFO, as_bytes(&info)))
            }
            (SocketAddr::V6(_), ip) => {
                let v6 = match ip {
                    IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                    IpAddr::V6(v6) => v6,
                };
                let info = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: v6.octets(),
                    },
                    ipi6_ifindex: 0,
                };
                Some((libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, as_bytes(&info)))
            }
            // An IPv4 socket cannot send from an IPv6 address.
            (SocketAddr::V4(_), IpAddr::V6(_)) => None,
        };
        if let Some((level, kind, (bytes, len))) = item {
            items[count] = (level, kind, bytes, len);
            count += 1;
        }
    }
    if let Some(size) = segment_size {
        let size = size.min(u16::MAX as usize) as u16;
        let mut bytes = [0u8; 20];
        bytes[..2].copy_from_slice(&size.to_ne_bytes());
        items[count] = (libc::SOL_UDP, libc::UDP_SEGMENT, bytes, 2);
        count += 1;
    }
    if let Some(tos) = tos {
        let mut bytes = [0u8; 20];
        bytes[..4].copy_from_slice(&libc::c_int::from(tos).to_ne_bytes());
        // An IPv4 destination (also as a mapped address on a dual-stack
        // socket) takes IP_TOS; an IPv6 one IPV6_TCLASS.
        let v4 = match destination {
            SocketAddr::V4(_) => true,
            SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped().is_some(),
        };
        items[count] = if v4 {
            (libc::IPPROTO_IP, libc::IP_TOS, bytes, 4)
        } else {
            (libc::IPPROTO_IPV6, libc::IPV6_TCLASS, bytes, 4)
        };
        count += 1;
    }
    let mut used = 0usize;
    // SAFETY: guaranteed by the caller: `msg_controllen` is still the whole
    // buffer, so CMSG_FIRSTHDR/CMSG_NXTHDR return slots inside it (or null).
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(header) };
    for &(level, kind, bytes, len) in &items[..count] {
        if cmsg.is_null() {
            break;
        }
        // SAFETY: `cmsg` is a header slot inside the buffer, which has room
        // for both payloads (at most 20 bytes each) and their headers.
        unsafe {
            (*cmsg).cmsg_level = level;
            (*cmsg).cmsg_type = kind;
            (*cmsg).cmsg_len = libc::CMSG_LEN(len as libc::c_uint) as _;
            ptr::copy_nonoverlapping(bytes.as_ptr(), libc::CMSG_DATA(cmsg), len);
            used += libc::CMSG_SPACE(len as libc::c_uint) as usize;
            cmsg = libc::CMSG_NXTHDR(header, cmsg);
        }
    }
    used
}

/// The bytes of a padding-free C struct of at most 20 bytes, and their
/// count.
fn as_bytes<T: Copy>(value: &T) -> ([u8; 20], usize) {
    let len = mem::size_of::<T>();
    assert!(len <= 20, "control payloads are at most 20 bytes");
    let mut bytes = [0u8; 20];
    // SAFETY: `T` is `in_pktinfo` or `in6_pktinfo`, which have no padding,
    // so all `len` bytes of `value` are initialised; `bytes` has room.
    unsafe { ptr::copy_nonoverlapping((value as *const T).cast::<u8>(), bytes.as_mut_ptr(), len) };
    (bytes, len)
}

/// The socket's drop counter now (`SO_MEMINFO`), where the kernel has it.
pub(super) fn drops(fd: RawFd) -> Option<u64> {
    let mut info = [0u32; 16];
    let mut len = mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: `info` is writable for `len` bytes and the kernel writes at
    // most `len` bytes into it, updating `len`.
    let result = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    let index = libc::SK_MEMINFO_DROPS as usize;
    if result != 0 || (len as usize) < (index + 1) * mem::size_of::<u32>() {
        return None;
    }
    Some(u64::from(info[index]))
}
