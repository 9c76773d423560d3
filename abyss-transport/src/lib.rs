//! Datagram transports for [Abyss](https://docs.rs/abyss).
//!
//! A [`Transport`] is a bound datagram endpoint that the Abyss server reads
//! batches from and writes replies to. It is poll-based (so it works inside
//! hand-written futures), dyn-compatible (the server holds
//! `Arc<dyn Transport>`), and batch-capable: one [`Transport::poll_recv`] call
//! may fill several buffers and one [`Transport::poll_send`] call may carry
//! several [`Transmit`]s, so `recvmmsg`/GRO and `sendmmsg`/GSO fit behind the
//! same trait.
//!
//! Two implementations ship here:
//!
//! * [`UdpTransport`]: a UDP socket on tokio, configured with [`UdpOptions`]
//!   (reuse address/port, broadcast, multicast, buffer sizes, v6-only, bind
//!   to device, GRO, GSO). On Linux it moves 32 datagrams per system call
//!   (`recvmmsg`/`sendmmsg`), reports the destination address of each
//!   datagram (`IP_PKTINFO` / `IPV6_RECVPKTINFO`), can send from a chosen
//!   source address, detects truncated datagrams and reads the kernel's drop
//!   counter (`SO_MEMINFO`).
//! * `MemoryNetwork` (feature `memory`): an in-process, deterministic
//!   datagram network for tests.
//!
//! A [`Bind`] opens a group of transports that share one local address, the
//! way a listener pool shares one port with `SO_REUSEPORT`.
//!
//! `Arc<T>` and `Box<T>` of a transport are transports. A transport that
//! wraps another one (to count, log or inject faults) returns it from
//! [`Transport::inner`], and keeps its batching, GRO/GSO, drop counter and
//! [`stop_receiving`](Transport::stop_receiving) without forwarding each
//! method by hand: see [Wrapping a
//! transport](Transport#wrapping-a-transport).
//!
//! # Example
//!
//! ```
//! use std::future::poll_fn;
//! use std::io::IoSliceMut;
//! use abyss_transport::{RecvMeta, Transmit, Transport, UdpOptions, UdpTransport};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! let server = UdpTransport::bind("127.0.0.1:0".parse().unwrap(), &UdpOptions::new())?;
//! let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
//! client.send_to(b"ping", server.local_addr()?).await?;
//!
//! let mut buf = [0u8; 1500];
//! let mut meta = [RecvMeta::default()];
//! let n = poll_fn(|cx| server.poll_recv(cx, &mut [IoSliceMut::new(&mut buf)], &mut meta)).await?;
//! assert_eq!(n, 1);
//! assert_eq!(&buf[..meta[0].len], b"ping");
//! assert!(!meta[0].truncated);
//!
//! let reply = Transmit::new(meta[0].peer, &buf[..meta[0].len]);
//! poll_fn(|cx| server.poll_send(cx, std::slice::from_ref(&reply))).await?;
//! let mut back = [0u8; 16];
//! let (len, _) = client.recv_from(&mut back).await?;
//! assert_eq!(&back[..len], b"ping");
//! # Ok(())
//! # }
//! ```

#![cfg_attr(docsrs, feature(doc_cfg))]

mod bind;
mod error;
mod inherited;
#[cfg(feature = "memory")]
mod memory;
mod transport;
mod udp;

pub use bind::Bind;
pub use error::OptionsError;
pub use inherited::BoundSockets;
#[cfg(feature = "memory")]
pub use memory::{MemoryNetwork, MemoryTransport};
pub use transport::{RecvMeta, Transmit, Transport, is_unicast};
pub use udp::{MulticastV4, MulticastV6, UdpOptions, UdpTransport};
