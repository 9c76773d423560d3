//! UDP sockets on tokio, configured with socket2 and read with `recvmsg`.

use std::io::{self, IoSliceMut};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;

use crate::{Bind, OptionsError, RecvMeta, Transmit, Transport};

#[cfg(not(unix))]
compile_error!("abyss-transport's UdpTransport supports unix systems only");

#[path = "udp/unix.rs"]
mod imp;
#[cfg(any(target_os = "linux", target_os = "android"))]
#[path = "udp/mmsg.rs"]
mod mmsg;

/// How many datagrams one `poll_recv`/`poll_send` call moves at most.
const BATCH: usize = 32;

/// An IPv4 multicast group to join, and the local interface address to join
/// it on (`0.0.0.0` lets the system choose).
///
/// # Example
///
/// ```
/// use std::net::Ipv4Addr;
/// use abyss_transport::{MulticastV4, UdpOptions};
///
/// // SSDP on the interface with address 192.0.2.10.
/// let ssdp = MulticastV4::new(Ipv4Addr::new(239, 255, 255, 250), Ipv4Addr::new(192, 0, 2, 10));
/// assert!(ssdp.group.is_multicast());
/// let options = UdpOptions::new().reuse_address(true).join_multicast_v4(ssdp);
/// # let _ = options;
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct MulticastV4 {
    /// The group, in 224.0.0.0/4.
    pub group: Ipv4Addr,
    /// The address of the interface to join on.
    pub interface: Ipv4Addr,
}

impl MulticastV4 {
    /// Group `group` on the interface with address `interface`.
    ///
    /// # Example
    ///
    /// ```
    /// use std::net::Ipv4Addr;
    /// use abyss_transport::{MulticastV4, UdpOptions};
    ///
    /// // mDNS on whatever interface the system picks.
    /// let mdns = MulticastV4::new(Ipv4Addr::new(224, 0, 0, 251), Ipv4Addr::UNSPECIFIED);
    /// let options = UdpOptions::new().join_multicast_v4(mdns);
    /// assert!(options.receives_group_traffic());
    /// ```
    pub fn new(group: Ipv4Addr, interface: Ipv4Addr) -> Self {
        Self { group, interface }
    }
}

/// An IPv6 multicast group to join, and the index of the interface to join it
/// on (0 lets the system choose).
///
/// # Example
///
/// ```
/// use abyss_transport::{MulticastV6, UdpOptions};
///
/// // All DHCPv6 relay agents and servers, on interface index 2.
/// let dhcp6 = MulticastV6::new("ff02::1:2".parse().unwrap(), 2);
/// assert_eq!(dhcp6.interface, 2);
/// let options = UdpOptions::new().join_multicast_v6(dhcp6);
/// # let _ = options;
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct MulticastV6 {
    /// The group, in ff00::/8.
    pub group: Ipv6Addr,
    /// The interface index.
    pub interface: u32,
}

impl MulticastV6 {
    /// Group `group` on the interface with index `interface`.
    ///
    /// # Example
    ///
    /// ```
    /// use std::net::Ipv6Addr;
    /// use abyss_transport::{MulticastV6, UdpOptions};
    ///
    /// // mDNS over IPv6 on the system's default interface (index 0).
    /// let mdns = MulticastV6::new("ff02::fb".parse::<Ipv6Addr>().unwrap(), 0);
    /// assert!(UdpOptions::new().join_multicast_v6(mdns).validate().is_ok());
    /// ```
    pub fn new(group: Ipv6Addr, interface: u32) -> Self {
        Self { group, interface }
    }
}

/// Socket options for [`UdpTransport`]; the original's `transport_options`.
///
/// Every option left unset keeps the operating system's default.
/// [`UdpOptions`] is also a [`Bind`]: it opens groups of sockets on one
/// address, and the group's port is its own (see
/// [`share_port`](UdpOptions::share_port)).
///
/// # Example
///
/// An mDNS listener's socket:
///
/// ```
/// use std::net::{Ipv4Addr, Ipv6Addr};
/// use abyss_transport::{MulticastV4, MulticastV6, UdpOptions};
///
/// let options = UdpOptions::new()
///     .reuse_address(true)
///     .join_multicast_v4(MulticastV4::new(Ipv4Addr::new(224, 0, 0, 251), Ipv4Addr::UNSPECIFIED))
///     .multicast_loop_v4(true)
///     .recv_buffer_size(1 << 20);
/// assert!(options.validate().is_ok());
///
/// let wrong = UdpOptions::new()
///     .join_multicast_v6(MulticastV6::new(Ipv6Addr::LOCALHOST, 0));
/// assert_eq!(wrong.validate().unwrap_err().field, "join_multicast_v6");
/// ```
#[derive(Debug, Clone)]
pub struct UdpOptions {
    reuse_address: bool,
    share_port: bool,
    broadcast: bool,
    multicast_v4: Vec<MulticastV4>,
    multicast_v6: Vec<MulticastV6>,
    multicast_loop_v4: Option<bool>,
    multicast_loop_v6: Option<bool>,
    multicast_ttl_v4: Option<u32>,
    multicast_hops_v6: Option<u32>,
    multicast_if_v4: Option<Ipv4Addr>,
    multicast_if_v6: Option<u32>,
    recv_buffer_size: Option<usize>,
    send_buffer_size: Option<usize>,
    only_v6: Option<bool>,
    bind_device: Option<String>,
    gro: bool,
    gso: bool,
    receive_timestamps: bool,
    receive_tos: bool,
}

impl Default for UdpOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl UdpOptions {
    /// The defaults: a port of the group's own, GSO where the kernel has
    /// it, everything else as the system sets it.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::{Bind, UdpOptions};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// let group = UdpOptions::new().bind_group("127.0.0.1:0".parse().unwrap(), 1)?;
    /// assert_eq!(group.len(), 1);
    /// # Ok(())
    /// # }
    /// ```
    pub fn new() -> Self {
        Self {
            reuse_address: false,
            share_port: false,
            broadcast: false,
            multicast_v4: Vec::new(),
            multicast_v6: Vec::new(),
            multicast_loop_v4: None,
            multicast_loop_v6: None,
            multicast_ttl_v4: None,
            multicast_hops_v6: None,
            multicast_if_v4: None,
            multicast_if_v6: None,
            recv_buffer_size: None,
            send_buffer_size: None,
            only_v6: None,
            bind_device: None,
            gro: false,
            gso: true,
            receive_timestamps: false,
            receive_tos: false,
        }
    }

    /// `SO_REUSEADDR`: let other sockets bind the same address (mDNS and
    /// other multicast listeners share port 5353 this way). Default off.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::UdpOptions;
    ///
    /// // Share port 5353 with other mDNS responders on the host.
    /// let options = UdpOptions::new().reuse_address(true);
    /// # let _ = options;
    /// ```
    #[must_use]
    pub fn reuse_address(mut self, on: bool) -> Self {
        self.reuse_address = on;
        self
    }

    /// Shares the port with sockets of other processes: `SO_REUSEPORT` is
    /// set before the group's first socket binds, so the group joins
    /// sockets of this user already bound there (the kernel then spreads
    /// peers over all of them). Default off.
    ///
    /// Off, the port is the group's own: binding an address another socket
    /// holds fails with [`io::ErrorKind::AddrInUse`], and port 0 picks a
    /// port no other socket holds. The group's own sockets still share the
    /// port (`SO_REUSEPORT` is set on the first one once it is bound), so
    /// a process that asks for sharing can still join it later.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::{Bind, UdpOptions};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// let mine = UdpOptions::new().bind_group("127.0.0.1:0".parse().unwrap(), 1)?;
    /// let addr = mine[0].local_addr()?;
    /// // The port is the group's own: a second group cannot bind it...
    /// let error = UdpOptions::new().bind_group(addr, 1).unwrap_err();
    /// assert_eq!(error.kind(), std::io::ErrorKind::AddrInUse);
    ///
    /// // ...while two groups that both share the port can.
    /// let shared = UdpOptions::new().share_port(true);
    /// let first = shared.bind_group("127.0.0.1:0".parse().unwrap(), 1)?;
    /// let second = shared.bind_group(first[0].local_addr()?, 1)?;
    /// assert_eq!(first[0].local_addr()?, second[0].local_addr()?);
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn share_port(mut self, on: bool) -> Self {
        self.share_port = on;
        self
    }

    /// Whether [`share_port`](UdpOptions::share_port) is on.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::UdpOptions;
    ///
    /// assert!(!UdpOptions::new().shares_port());
    /// assert!(UdpOptions::new().share_port(true).shares_port());
    /// ```
    pub fn shares_port(&self) -> bool {
        self.share_port
    }

    /// Whether the options ask for broadcast or multicast datagrams
    /// (`broadcast`, or a multicast group to join), whose every copy
    /// reaches each socket bound to the port.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::UdpOptions;
    ///
    /// assert!(!UdpOptions::new().receives_group_traffic());
    /// assert!(UdpOptions::new().broadcast(true).receives_group_traffic());
    /// ```
    pub fn receives_group_traffic(&self) -> bool {
        self.broadcast || !self.multicast_v4.is_empty() || !self.multicast_v6.is_empty()
    }

    /// `SO_BROADCAST`: allow sending to broadcast addresses (DHCP). Default
    /// off.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::UdpOptions;
    ///
    /// // A DHCP server: receives and sends to 255.255.255.255.
    /// let options = UdpOptions::new().broadcast(true).reuse_address(true);
    /// assert!(options.receives_group_traffic());
    /// ```
    #[must_use]
    pub fn broadcast(mut self, on: bool) -> Self {
        self.broadcast = on;
        self
    }

    /// Joins an IPv4 multicast group when the socket is opened.
    ///
    /// The kernel hands every multicast (and broadcast) datagram to each
    /// socket bound to the port, `SO_REUSEPORT` group or not: a multicast
    /// server should run one listener, or each datagram is handled once per
    /// listener.
    ///
    /// # Example
    ///
    /// ```
    /// use std::net::Ipv4Addr;
    /// use abyss_transport::{MulticastV4, UdpOptions};
    ///
    /// let options = UdpOptions::new()
    ///     .reuse_address(true)
    ///     .join_multicast_v4(MulticastV4::new(Ipv4Addr::new(224, 0, 0, 251), Ipv4Addr::UNSPECIFIED));
    /// assert!(options.validate().is_ok());
    ///
    /// // Not a multicast address: refused before any socket is opened.
    /// let wrong = UdpOptions::new()
    ///     .join_multicast_v4(MulticastV4::new(Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::UNSPECIFIED));
    /// assert_eq!(wrong.validate().unwrap_err().field, "join_multicast_v4");
    /// ```
    #[must_use]
    pub fn join_multicast_v4(mut self, membership: MulticastV4) -> Self {
        self.multicast_v4.push(membership);
        self
    }

    /// Joins an IPv6 multicast group when the socket is opened (see
    /// [`join_multicast_v4`](UdpOptions::join_multicast_v4) on listeners).
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::{MulticastV6, UdpOptions};
    ///
    /// let options = UdpOptions::new()
    ///     .only_v6(true)
    ///     .join_multicast_v6(MulticastV6::new("ff02::fb".parse().unwrap(), 0));
    /// assert!(options.validate().is_ok());
    /// ```
    #[must_use]
    pub fn join_multicast_v6(mut self, membership: MulticastV6) -> Self {
        self.multicast_v6.push(membership);
        self
    }

    /// `IP_MULTICAST_LOOP`: whether multicast this socket sends is looped
    /// back to local listeners.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::UdpOptions;
    ///
    /// // Do not hear our own announcements.
    /// let options = UdpOptions::new().multicast_loop_v4(false);
    /// # let _ = options;
    /// ```
    #[must_use]
    pub fn multicast_loop_v4(mut self, on: bool) -> Self {
        self.multicast_loop_v4 = Some(on);
        self
    }

    /// `IPV6_MULTICAST_LOOP`.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::UdpOptions;
    ///
    /// let options = UdpOptions::new().multicast_loop_v6(false);
    /// # let _ = options;
    /// ```
    #[must_use]
    pub fn multicast_loop_v6(mut self, on: bool) -> Self {
        self.multicast_loop_v6 = Some(on);
        self
    }

    /// `IP_MULTICAST_TTL` (0 to 255).
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::UdpOptions;
    ///
    /// // mDNS sends with a TTL of 255.
    /// assert!(UdpOptions::new().multicast_ttl_v4(255).validate().is_ok());
    /// assert_eq!(UdpOptions::new().multicast_ttl_v4(256).validate().unwrap_err().field, "multicast_ttl_v4");
    /// ```
    #[must_use]
    pub fn multicast_ttl_v4(mut self, ttl: u32) -> Self {
        self.multicast_ttl_v4 = Some(ttl);
        self
    }

    /// `IPV6_MULTICAST_HOPS` (0 to 255).
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::UdpOptions;
    ///
    /// assert!(UdpOptions::new().multicast_hops_v6(255).validate().is_ok());
    /// assert!(UdpOptions::new().multicast_hops_v6(1000).validate().is_err());
    /// ```
    #[must_use]
    pub fn multicast_hops_v6(mut self, hops: u32) -> Self {
        self.multicast_hops_v6 = Some(hops);
        self
    }

    /// `IP_MULTICAST_IF`: the interface address multicast is sent from (the
    /// original's `multicast_if`).
    ///
    /// # Example
    ///
    /// ```
    /// use std::net::Ipv4Addr;
    /// use abyss_transport::UdpOptions;
    ///
    /// let options = UdpOptions::new().multicast_if_v4(Ipv4Addr::new(192, 0, 2, 10));
    /// # let _ = options;
    /// ```
    #[must_use]
    pub fn multicast_if_v4(mut self, interface: Ipv4Addr) -> Self {
        self.multicast_if_v4 = Some(interface);
        self
    }

    /// `IPV6_MULTICAST_IF`: the interface index multicast is sent from.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::UdpOptions;
    ///
    /// let options = UdpOptions::new().multicast_if_v6(2); // interface index 2
    /// # let _ = options;
    /// ```
    #[must_use]
    pub fn multicast_if_v6(mut self, interface: u32) -> Self {
        self.multicast_if_v6 = Some(interface);
        self
    }

    /// `SO_RCVBUF` in bytes (the original's `recbuf`). The system may double
    /// or cap it (Linux: `net.core.rmem_max`).
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::{UdpOptions, UdpTransport};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// // Room for bursts while the service is busy.
    /// let options = UdpOptions::new().recv_buffer_size(4 << 20);
    /// let transport = UdpTransport::bind("127.0.0.1:0".parse().unwrap(), &options)?;
    /// # let _ = transport;
    /// assert_eq!(UdpOptions::new().recv_buffer_size(0).validate().unwrap_err().field, "recv_buffer_size");
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn recv_buffer_size(mut self, bytes: usize) -> Self {
        self.recv_buffer_size = Some(bytes);
        self
    }

    /// `SO_SNDBUF` in bytes (the original's `sndbuf`).
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::UdpOptions;
    ///
    /// let options = UdpOptions::new().send_buffer_size(1 << 20);
    /// assert!(options.validate().is_ok());
    /// ```
    #[must_use]
    pub fn send_buffer_size(mut self, bytes: usize) -> Self {
        self.send_buffer_size = Some(bytes);
        self
    }

    /// `IPV6_V6ONLY`: for an IPv6 bind address, `false` makes the socket
    /// dual-stack (IPv4 peers appear as `::ffff:a.b.c.d`).
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::UdpOptions;
    ///
    /// // One socket on [::] for IPv6 and IPv4 peers alike.
    /// let dual_stack = UdpOptions::new().only_v6(false);
    /// # let _ = dual_stack;
    /// ```
    #[must_use]
    pub fn only_v6(mut self, on: bool) -> Self {
        self.only_v6 = Some(on);
        self
    }

    /// `SO_BINDTODEVICE` (Linux): receive and send only through the named
    /// interface. Needs `CAP_NET_RAW` on most kernels.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::UdpOptions;
    ///
    /// assert!(UdpOptions::new().bind_device("eth0").validate().is_ok());
    /// assert_eq!(UdpOptions::new().bind_device("").validate().unwrap_err().field, "bind_device");
    /// ```
    #[must_use]
    pub fn bind_device(mut self, interface: impl Into<String>) -> Self {
        self.bind_device = Some(interface.into());
        self
    }

    /// `UDP_GRO` (Linux): let the kernel hand over runs of same-sized
    /// datagrams from one peer as one buffer (the receiver splits them by
    /// [`RecvMeta::stride`]). Saves kernel work per datagram when peers send
    /// bursts; needs 64 KiB receive buffers, so a server reads fewer
    /// buffers per system call. Default off; ignored where unsupported.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::{Transport, UdpOptions, UdpTransport};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// let transport = UdpTransport::bind("127.0.0.1:0".parse().unwrap(), &UdpOptions::new().gro(true))?;
    /// // Above 1 where the kernel coalesces; give such buffers 64 KiB.
    /// let segments = transport.max_receive_segments();
    /// # let _ = segments;
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn gro(mut self, on: bool) -> Self {
        self.gro = on;
        self
    }

    /// `UDP_SEGMENT` (Linux GSO): allow [`Transmit::segment_size`], so that
    /// several same-sized datagrams to one destination go down the stack as
    /// one. Default on where the kernel supports it.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::{Transport, UdpOptions, UdpTransport};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// let transport = UdpTransport::bind("127.0.0.1:0".parse().unwrap(), &UdpOptions::new().gso(false))?;
    /// assert_eq!(transport.max_transmit_segments(), 1);
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn gso(mut self, on: bool) -> Self {
        self.gso = on;
        self
    }

    /// `SO_TIMESTAMPNS` (Linux): the kernel's time of arrival of each
    /// datagram, in [`RecvMeta::timestamp`]: when the packet reached the
    /// host, before any queueing in the socket. Off by default: turning it
    /// on makes the kernel timestamp every packet.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::UdpOptions;
    ///
    /// let options = UdpOptions::new().receive_timestamps(true);
    /// # let _ = options;
    /// ```
    #[must_use]
    pub fn receive_timestamps(mut self, on: bool) -> Self {
        self.receive_timestamps = on;
        self
    }

    /// `IP_RECVTOS` / `IPV6_RECVTCLASS` (Linux): each datagram's TOS or
    /// traffic class byte (DSCP and ECN), in [`RecvMeta::tos`]. Off by
    /// default.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::UdpOptions;
    ///
    /// let options = UdpOptions::new().receive_tos(true);
    /// # let _ = options;
    /// ```
    #[must_use]
    pub fn receive_tos(mut self, on: bool) -> Self {
        self.receive_tos = on;
        self
    }

    /// Checks the options without opening a socket.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::UdpOptions;
    ///
    /// let error = UdpOptions::new().send_buffer_size(0).validate().unwrap_err();
    /// assert_eq!(error.field, "send_buffer_size");
    /// assert_eq!(error.to_string(), "invalid transport option `send_buffer_size`: must not be 0");
    /// ```
    pub fn validate(&self) -> Result<(), OptionsError> {
        if let Some(m) = self.multicast_v4.iter().find(|m| !m.group.is_multicast()) {
            return Err(OptionsError::new(
                "join_multicast_v4",
                format!("{} is not an IPv4 multicast address (224.0.0.0/4)", m.group),
            ));
        }
        if let Some(m) = self.multicast_v6.iter().find(|m| !m.group.is_multicast()) {
            return Err(OptionsError::new(
                "join_multicast_v6",
                format!("{} is not an IPv6 multicast address (ff00::/8)", m.group),
            ));
        }
        if let Some(ttl) = self.multicast_ttl_v4.filter(|ttl| *ttl > 255) {
            return Err(OptionsError::new(
                "multicast_ttl_v4",
                format!("{ttl} is over 255"),
            ));
        }
        if let Some(hops) = self.multicast_hops_v6.filter(|hops| *hops > 255) {
            return Err(OptionsError::new(
                "multicast_hops_v6",
                format!("{hops} is over 255"),
            ));
        }
        if self.recv_buffer_size == Some(0) {
            return Err(OptionsError::new("recv_buffer_size", "must not be 0"));
        }
        if self.send_buffer_size == Some(0) {
            return Err(OptionsError::new("send_buffer_size", "must not be 0"));
        }
        if let Some(name) = &self.bind_device {
            // IFNAMSIZ is 16 including the terminating NUL.
            if name.is_empty() || name.len() > 15 || name.contains('\0') {
                return Err(OptionsError::new(
                    "bind_device",
                    format!("{name:?} is not an interface name (1 to 15 bytes, no NUL)"),
                ));
            }
        }
        Ok(())
    }

    /// Opens, configures and binds one socket (not yet registered with
    /// tokio), with `SO_REUSEPORT` set before the bind when `reuse_port`.
    fn open(&self, addr: SocketAddr, reuse_port: bool) -> io::Result<Socket> {
        self.validate()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        if self.reuse_address {
            socket.set_reuse_address(true)?;
        }
        if reuse_port {
            socket.set_reuse_port(true)?;
        }
        if self.broadcast {
            socket.set_broadcast(true)?;
        }
        if let Some(bytes) = self.recv_buffer_size {
            socket.set_recv_buffer_size(bytes)?;
        }
        if let Some(bytes) = self.send_buffer_size {
            socket.set_send_buffer_size(bytes)?;
        }
        if addr.is_ipv6()
            && let Some(on) = self.only_v6
        {
            socket.set_only_v6(on)?;
        }
        if let Some(name) = &self.bind_device {
            socket.bind_device(Some(name.as_bytes()))?;
        }
        if let Some(on) = self.multicast_loop_v4 {
            socket.set_multicast_loop_v4(on)?;
        }
        if let Some(on) = self.multicast_loop_v6 {
            socket.set_multicast_loop_v6(on)?;
        }
        if let Some(ttl) = self.multicast_ttl_v4 {
            socket.set_multicast_ttl_v4(ttl)?;
        }
        if let Some(hops) = self.multicast_hops_v6 {
            socket.set_multicast_hops_v6(hops)?;
        }
        if let Some(interface) = self.multicast_if_v4 {
            socket.set_multicast_if_v4(&interface)?;
        }
        if let Some(interface) = self.multicast_if_v6 {
            socket.set_multicast_if_v6(interface)?;
        }
        imp::enable_metadata(&socket, addr)?;
        imp::enable_extra_metadata(&socket, addr, self.receive_timestamps, self.receive_tos)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        for m in &self.multicast_v4 {
            socket.join_multicast_v4(&m.group, &m.interface)?;
        }
        for m in &self.multicast_v6 {
            socket.join_multicast_v6(&m.group, m.interface)?;
        }
        Ok(socket)
    }
}

impl Bind for UdpOptions {
    /// Binds the first socket without `SO_REUSEPORT` (unless
    /// [`share_port`](UdpOptions::share_port)), so that a port another
    /// socket holds is refused and port 0 yields a port nobody holds; then
    /// sets it, and binds the others with it on the port the first one got.
    fn bind_group(&self, addr: SocketAddr, count: usize) -> io::Result<Vec<Arc<dyn Transport>>> {
        let first = self.open(addr, self.share_port)?;
        if !self.share_port {
            first.set_reuse_port(true)?;
        }
        let first = UdpTransport::from_socket(first, self)?;
        // With port 0 the first socket picks the port and the rest join it.
        let shared = first.local_addr()?;
        let mut group: Vec<Arc<dyn Transport>> = Vec::with_capacity(count);
        group.push(Arc::new(first));
        for _ in 1..count {
            group.push(Arc::new(self.join(shared)?));
        }
        Ok(group)
    }

    fn join_group(&self, addr: SocketAddr) -> io::Result<Arc<dyn Transport>> {
        Ok(Arc::new(self.join(addr)?))
    }
}

impl UdpOptions {
    /// One more socket in the group bound on `addr`.
    fn join(&self, addr: SocketAddr) -> io::Result<UdpTransport> {
        UdpTransport::from_socket(self.open(addr, true)?, self)
    }
}

/// A UDP socket driven by tokio.
///
/// Opened with [`UdpTransport::bind`] (options from [`UdpOptions`]) or
/// adopted with [`UdpTransport::from_std`]. Must be created inside a tokio
/// runtime.
///
/// On Linux it moves up to 32 datagrams per system call (`recvmmsg`,
/// `sendmmsg`), reports a datagram longer than its buffer as
/// [`truncated`](RecvMeta::truncated), reports the destination address of
/// each datagram and, when bound to a wildcard address, sends from the
/// [`src_ip`](Transmit::src_ip) it is given, so a multi-homed server answers
/// from the address it was asked on. It sends GSO transmits where the kernel
/// supports them and, with [`UdpOptions::gro`], receives GRO buffers. On
/// other unix systems it reads and writes one datagram per call with
/// `recvmsg`/`sendmsg` (truncation still detected), without destination
/// addresses, GSO or GRO.
///
/// # Example
///
/// An echo of one datagram:
///
/// ```
/// use std::future::poll_fn;
/// use std::io::IoSliceMut;
/// use abyss_transport::{RecvMeta, Transmit, Transport, UdpOptions, UdpTransport};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> std::io::Result<()> {
/// let server = UdpTransport::bind("127.0.0.1:0".parse().unwrap(), &UdpOptions::new())?;
/// let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
/// client.send_to(b"echo", server.local_addr()?).await?;
///
/// let mut buf = [0u8; 1500];
/// let mut meta = [RecvMeta::default()];
/// poll_fn(|cx| server.poll_recv(cx, &mut [IoSliceMut::new(&mut buf)], &mut meta)).await?;
/// let reply = Transmit::new(meta[0].peer, &buf[..meta[0].len]).with_src_ip(meta[0].local_ip);
/// poll_fn(|cx| server.poll_send(cx, &[reply])).await?;
///
/// let mut back = [0u8; 16];
/// let n = client.recv(&mut back).await?;
/// assert_eq!(&back[..n], b"echo");
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct UdpTransport {
    io: tokio::net::UdpSocket,
    local: SocketAddr,
    /// Every task waiting to send, woken together (tokio keeps one waker
    /// per direction).
    writers: Arc<Writers>,
    /// The waker that wakes every one of `writers`, made once.
    wake_writers: Waker,
    /// `stop_receiving` was called: receives read the socket directly.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    stopped: std::sync::atomic::AtomicBool,
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    state: imp::State,
    segments: imp::Segments,
}

impl UdpTransport {
    /// Opens a socket on `addr` with `options`.
    ///
    /// Invalid options give an [`io::ErrorKind::InvalidInput`] error whose
    /// inner error is an [`OptionsError`]; an address already taken gives
    /// [`io::ErrorKind::AddrInUse`] (unless
    /// [`share_port`](UdpOptions::share_port) and the holder shares too).
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::{Transport, UdpOptions, UdpTransport};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// let transport = UdpTransport::bind("127.0.0.1:0".parse().unwrap(), &UdpOptions::new())?;
    /// let taken = transport.local_addr()?;
    /// let error = UdpTransport::bind(taken, &UdpOptions::new()).unwrap_err();
    /// assert_eq!(error.kind(), std::io::ErrorKind::AddrInUse);
    ///
    /// let invalid = UdpTransport::bind("127.0.0.1:0".parse().unwrap(), &UdpOptions::new().recv_buffer_size(0));
    /// assert_eq!(invalid.unwrap_err().kind(), std::io::ErrorKind::InvalidInput);
    /// # Ok(())
    /// # }
    /// ```
    pub fn bind(addr: SocketAddr, options: &UdpOptions) -> io::Result<Self> {
        Self::from_socket(options.open(addr, options.share_port)?, options)
    }

    fn from_socket(socket: Socket, options: &UdpOptions) -> io::Result<Self> {
        let segments = imp::Segments::enable(&socket, options.gro, options.gso);
        Self::adopt(socket.into(), segments)
    }

    /// Adopts a bound socket, turning on destination-address reporting and
    /// the kernel drop counter where the system has them.
    /// GSO is used where the kernel supports it; GRO is left as the socket
    /// has it.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::{Transport, UdpTransport};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// // A socket bound elsewhere (handed over by systemd, say).
    /// let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    /// let addr = socket.local_addr()?;
    /// let transport = UdpTransport::from_std(socket)?;
    /// assert_eq!(transport.local_addr()?, addr);
    /// # Ok(())
    /// # }
    /// ```
    pub fn from_std(socket: std::net::UdpSocket) -> io::Result<Self> {
        let segments = imp::Segments::enable(&socket2::SockRef::from(&socket), false, true);
        Self::adopt(socket, segments)
    }

    fn adopt(socket: std::net::UdpSocket, segments: imp::Segments) -> io::Result<Self> {
        socket.set_nonblocking(true)?;
        let local = socket.local_addr()?;
        imp::enable_metadata(&socket2::SockRef::from(&socket), local)?;
        let writers = Arc::<Writers>::default();
        Ok(Self {
            io: tokio::net::UdpSocket::from_std(socket)?,
            local,
            wake_writers: Waker::from(writers.clone()),
            writers,
            #[cfg(any(target_os = "linux", target_os = "android"))]
            stopped: std::sync::atomic::AtomicBool::new(false),
            #[cfg(not(any(target_os = "linux", target_os = "android")))]
            state: imp::State::default(),
            segments,
        })
    }

    /// Joins an IPv4 multicast group on a socket that is already open.
    ///
    /// # Example
    ///
    /// ```
    /// use std::net::Ipv4Addr;
    /// use abyss_transport::{MulticastV4, UdpOptions, UdpTransport};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// let transport = UdpTransport::bind("0.0.0.0:0".parse().unwrap(), &UdpOptions::new())?;
    /// let group = MulticastV4::new(Ipv4Addr::new(239, 255, 0, 1), Ipv4Addr::LOCALHOST);
    /// // Fails on a host without multicast routes; fine either way here.
    /// if transport.join_multicast_v4(group).is_ok() {
    ///     transport.leave_multicast_v4(group)?;
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn join_multicast_v4(&self, membership: MulticastV4) -> io::Result<()> {
        self.io
            .join_multicast_v4(membership.group, membership.interface)
    }

    /// Leaves an IPv4 multicast group.
    ///
    /// # Example
    ///
    /// ```
    /// use std::net::Ipv4Addr;
    /// use abyss_transport::{MulticastV4, UdpOptions, UdpTransport};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// let transport = UdpTransport::bind("0.0.0.0:0".parse().unwrap(), &UdpOptions::new())?;
    /// let group = MulticastV4::new(Ipv4Addr::new(239, 255, 0, 2), Ipv4Addr::LOCALHOST);
    /// // Leaving a group never joined fails.
    /// assert!(transport.leave_multicast_v4(group).is_err());
    /// # Ok(())
    /// # }
    /// ```
    pub fn leave_multicast_v4(&self, membership: MulticastV4) -> io::Result<()> {
        self.io
            .leave_multicast_v4(membership.group, membership.interface)
    }

    /// Joins an IPv6 multicast group on a socket that is already open.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::{MulticastV6, UdpOptions, UdpTransport};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// # if std::net::UdpSocket::bind("[::1]:0").is_err() { return Ok(()); }
    /// let transport = UdpTransport::bind("[::]:0".parse().unwrap(), &UdpOptions::new())?;
    /// let group = MulticastV6::new("ff02::1:3".parse().unwrap(), 0);
    /// // Fails on a host without IPv6 multicast; fine either way here.
    /// if transport.join_multicast_v6(group).is_ok() {
    ///     transport.leave_multicast_v6(group)?;
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn join_multicast_v6(&self, membership: MulticastV6) -> io::Result<()> {
        self.io
            .join_multicast_v6(&membership.group, membership.interface)
    }

    /// Leaves an IPv6 multicast group.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::{MulticastV6, UdpOptions, UdpTransport};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// # if std::net::UdpSocket::bind("[::1]:0").is_err() { return Ok(()); }
    /// let transport = UdpTransport::bind("[::]:0".parse().unwrap(), &UdpOptions::new())?;
    /// let group = MulticastV6::new("ff02::1:4".parse().unwrap(), 0);
    /// assert!(transport.leave_multicast_v6(group).is_err(), "never joined");
    /// # Ok(())
    /// # }
    /// ```
    pub fn leave_multicast_v6(&self, membership: MulticastV6) -> io::Result<()> {
        self.io
            .leave_multicast_v6(&membership.group, membership.interface)
    }

    /// The tokio socket underneath, for options this type does not cover.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_transport::{UdpOptions, UdpTransport};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// let transport = UdpTransport::bind("127.0.0.1:0".parse().unwrap(), &UdpOptions::new())?;
    /// transport.as_tokio().set_ttl(16)?;
    /// assert_eq!(transport.as_tokio().ttl()?, 16);
    /// # Ok(())
    /// # }
    /// ```
    pub fn as_tokio(&self) -> &tokio::net::UdpSocket {
        &self.io
    }
}

impl UdpTransport {
    /// Waits until the socket may be writable, waking every task that
    /// waits here (not only the last, as tokio's own slot would).
    fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.writers.add(cx.waker());
        // Ready already: the caller retries now, and stays registered
        // until the next wake-up (a spurious wake-up is cheap).
        self.io
            .poll_send_ready(&mut Context::from_waker(&self.wake_writers))
    }

    /// Runs `op` once the socket is ready for `interest`, waiting again
    /// whenever it would block.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    fn poll_io<T>(
        &self,
        cx: &mut Context<'_>,
        interest: Interest,
        mut op: impl FnMut() -> io::Result<T>,
    ) -> Poll<io::Result<T>> {
        loop {
            match self.io.try_io(interest, &mut op) {
                // Readiness was cleared by try_io; wait for the next edge.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if interest.is_readable() {
                        ready!(self.io.poll_recv_ready(cx))?;
                    } else {
                        ready!(self.poll_writable(cx))?;
                    }
                }
                result => return Poll::Ready(result),
            }
        }
    }

    /// One `recvmmsg` per call.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    fn poll_recv_batch(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.io);
        if self.stopped.load(std::sync::atomic::Ordering::Relaxed) {
            // Closing: read what is queued whatever tokio last heard from
            // epoll (its readiness may lag a burst that just arrived).
            match mmsg::recv(fd, bufs, meta) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                result => return Poll::Ready(result),
            }
        }
        self.poll_io(cx, Interest::READABLE, || mmsg::recv(fd, bufs, meta))
    }

    /// One `recvmsg` per datagram, until the socket is empty or the batch
    /// full.
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    fn poll_recv_batch(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        if let Some(error) = self.state.take_deferred_error() {
            return Poll::Ready(Err(error));
        }
        let max = bufs.len().min(meta.len());
        let mut filled = 0;
        while filled < max {
            let received = self.io.try_io(Interest::READABLE, || {
                imp::recv(&self.io, &self.state, &mut bufs[filled], &mut meta[filled])
            });
            match received {
                Ok(()) => filled += 1,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if filled > 0 {
                        break;
                    }
                    ready!(self.io.poll_recv_ready(cx))?;
                }
                Err(e) if filled > 0 => {
                    self.state.defer_error(e);
                    break;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(filled))
    }

    /// One `sendmmsg` per call.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    fn poll_send_batch(
        &self,
        cx: &mut Context<'_>,
        transmits: &[Transmit<'_>],
    ) -> Poll<io::Result<usize>> {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.io);
        self.poll_io(cx, Interest::WRITABLE, || {
            mmsg::send(fd, self.local, transmits)
        })
    }

    /// One `sendmsg` per datagram.
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    fn poll_send_batch(
        &self,
        cx: &mut Context<'_>,
        transmits: &[Transmit<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut sent = 0;
        while sent < transmits.len() {
            let result = self.io.try_io(Interest::WRITABLE, || {
                imp::send(&self.io, self.local, &transmits[sent])
            });
            match result {
                Ok(()) => sent += 1,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if sent > 0 {
                        break;
                    }
                    ready!(self.poll_writable(cx))?;
                }
                Err(_) if sent > 0 => break,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(sent))
    }
}

impl Transport for UdpTransport {
    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        if bufs.is_empty() || meta.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.poll_recv_batch(cx, bufs, meta)
    }

    fn poll_send(
        &self,
        cx: &mut Context<'_>,
        transmits: &[Transmit<'_>],
    ) -> Poll<io::Result<usize>> {
        if transmits.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.poll_send_batch(cx, transmits)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }

    fn max_receive_batch(&self) -> usize {
        BATCH
    }

    fn max_transmit_batch(&self) -> usize {
        BATCH
    }

    fn kernel_drops(&self) -> Option<u64> {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        return mmsg::drops(std::os::fd::AsRawFd::as_raw_fd(&self.io));
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        None
    }

    fn max_receive_segments(&self) -> usize {
        self.segments.receive
    }

    fn max_transmit_segments(&self) -> usize {
        self.segments.transmit
    }

    /// On Linux, a socket bound to one address is connected to that
    /// address: the kernel then hands it only datagrams from itself (none),
    /// so new ones go to the group's other sockets or are refused as sent
    /// to a closed port. Connecting a socket bound to a wildcard address
    /// would also fix its source address, so such a socket gets a filter
    /// that drops every new datagram instead, counted in
    /// [`kernel_drops`](Transport::kernel_drops) (it stays in its
    /// `SO_REUSEPORT` group meanwhile, so the peers the kernel hashes to it
    /// are dropped until it closes). Either way, what is queued stays
    /// readable, and receives from then on read the socket directly rather
    /// than wait for readiness. Elsewhere (where a connected socket cannot
    /// send to other addresses) this does nothing.
    #[cfg(unix)]
    fn socket(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        Some(std::os::fd::AsFd::as_fd(&self.io))
    }

    fn stop_receiving(&self) -> io::Result<()> {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            let socket = socket2::SockRef::from(&self.io);
            if self.local.ip().is_unspecified() {
                // A classic BPF program of one instruction: return 0 (keep
                // nothing).
                const BPF_RET_K: u16 = 0x06;
                socket.attach_filter(&[socket2::SockFilter::new(BPF_RET_K, 0, 0, 0)])?;
            } else {
                socket.connect(&self.local.into())?;
            }
            self.stopped
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }
}

/// The tasks waiting for a socket to become writable.
#[derive(Debug, Default)]
struct Writers {
    waiting: std::sync::Mutex<Vec<Waker>>,
}

impl Writers {
    fn add(&self, waker: &Waker) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        if !waiting.iter().any(|w| w.will_wake(waker)) {
            waiting.push(waker.clone());
        }
    }
}

impl std::task::Wake for Writers {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let waiting = std::mem::take(&mut *self.waiting.lock().unwrap_or_else(|e| e.into_inner()));
        for waker in waiting {
            waker.wake();
        }
    }
}
