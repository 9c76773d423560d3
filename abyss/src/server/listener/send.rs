//! The send side of a listener: replies wait in an outbox, go out in
//! batches, and runs of replies to one peer go out as GSO transmits that
//! the kernel can split back exactly. A run the kernel refuses is sent
//! again one datagram per transmit in the same flush, so no reply is
//! counted sent unless the kernel took it, and none is dropped for a
//! reason that sending it alone would not meet.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::task::{Context, Poll};

use bytes::Bytes;

use super::super::stats::{Counters, Outcome};
use super::MAX_BATCH;
use super::drop_log::LogGate;
use crate::middleware::targets::{CONNECTION, LISTENER};
use crate::transport::{Transmit, Transport};

/// The most payload one GSO transmit carries.
const GSO_MAX_BYTES: usize = 65_000;
/// Replies copied into one send buffer per flush, for GSO.
const GSO_BUFFER: usize = 256 * 1024;
/// The largest GSO segment by default: what one unfragmented datagram
/// carries on a path with the Ethernet MTU of 1500 bytes (less the IPv4 or
/// IPv6 header and the UDP header). The kernel refuses a larger segment on
/// such a path (`EMSGSIZE`) rather than fragment it, so larger replies go
/// out one per transmit and the kernel fragments them as it would any
/// datagram.
const SEGMENT_V4: usize = 1500 - 20 - 8;
const SEGMENT_V6: usize = 1500 - 40 - 8;
/// Linux's `errno` values for a device that cannot segment, and for a
/// segment longer than the path carries (`EMSGSIZE`; kernels before the
/// 2025 stable updates say `EINVAL`). GSO is Linux-only.
const EIO: i32 = 5;
const EINVAL: i32 = 22;
const EMSGSIZE: i32 = 90;

/// A reply waiting for the socket.
pub(super) struct Outgoing {
    pub(super) destination: SocketAddr,
    pub(super) src_ip: Option<IpAddr>,
    pub(super) tos: Option<u8>,
    pub(super) payload: Bytes,
}

pub(super) struct Outbox {
    queue: VecDeque<Outgoing>,
    max_transmit: usize,
    /// Datagrams one transmit may carry (GSO), 1 without or once the
    /// system has shown it cannot segment.
    transmit_segments: usize,
    /// The largest GSO segment per address family, lowered when a path
    /// refuses one as too long.
    segment_v4: usize,
    segment_v6: usize,
    /// Replies at the front of the queue to send one per transmit: they
    /// were part of a run the kernel refused.
    singles: usize,
    /// Where replies to one peer are laid end to end for GSO.
    gso_buffer: Vec<u8>,
    log: LogGate,
}

impl Outbox {
    pub(super) fn new(transport: &dyn Transport) -> Self {
        let transmit_segments = transport.max_transmit_segments().max(1);
        Self {
            queue: VecDeque::new(),
            max_transmit: transport.max_transmit_batch().clamp(1, MAX_BATCH),
            transmit_segments,
            segment_v4: SEGMENT_V4,
            segment_v6: SEGMENT_V6,
            singles: 0,
            gso_buffer: if transmit_segments > 1 {
                Vec::with_capacity(GSO_BUFFER)
            } else {
                Vec::new()
            },
            log: LogGate::default(),
        }
    }

    pub(super) fn push(&mut self, reply: Outgoing) {
        self.queue.push_back(reply);
    }

    pub(super) fn len(&self) -> usize {
        self.queue.len()
    }

    /// Empties the queue, returning the peers of what was in it.
    pub(super) fn clear(&mut self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.singles = 0;
        self.queue.drain(..).map(|out| out.destination)
    }

    /// Sends queued replies until the socket pushes back. Returns whether
    /// anything was sent or dropped.
    pub(super) fn poll_flush(
        &mut self,
        cx: &mut Context<'_>,
        transport: &dyn Transport,
        counters: &Counters,
        index: usize,
    ) -> bool {
        let mut progress = false;
        while !self.queue.is_empty() {
            // Plan up to `max_transmit` transmits; with GSO a transmit
            // carries a run of replies to one peer, laid end to end in the
            // GSO buffer.
            let mut covers = [1usize; MAX_BATCH];
            let mut spans: [Option<(usize, usize)>; MAX_BATCH] = [None; MAX_BATCH];
            let mut count = 0;
            let mut next = 0;
            self.gso_buffer.clear();
            while count < self.max_transmit && next < self.queue.len() {
                let run = self.run_from(next);
                if run > 1 {
                    let start = self.gso_buffer.len();
                    for out in self.queue.range(next..next + run) {
                        self.gso_buffer.extend_from_slice(&out.payload);
                    }
                    spans[count] = Some((start, self.gso_buffer.len()));
                }
                covers[count] = run;
                next += run;
                count += 1;
            }
            let unused = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
            let mut first = 0;
            let transmits: [Transmit<'_>; MAX_BATCH] = std::array::from_fn(|k| {
                if k >= count {
                    return Transmit::new(unused, &[]);
                }
                let out = &self.queue[first];
                first += covers[k];
                match spans[k] {
                    Some((start, end)) => {
                        let mut transmit =
                            Transmit::new(out.destination, &self.gso_buffer[start..end])
                                .with_src_ip(out.src_ip)
                                .with_tos(out.tos);
                        transmit.segment_size = Some(out.payload.len());
                        transmit
                    }
                    None => Transmit::new(out.destination, &out.payload)
                        .with_src_ip(out.src_ip)
                        .with_tos(out.tos),
                }
            });
            let polled = transport.poll_send(cx, &transmits[..count]);
            match polled {
                Poll::Pending => break,
                Poll::Ready(Ok(sent)) if sent > 0 => {
                    if sent > count {
                        // The transport claims more than it was given: believe
                        // the part it was given, and say so.
                        tracing::error!(target: LISTENER, listener = index, sent, count, "transport reported more transmits sent than it was given");
                    }
                    let replies: usize = covers[..sent.min(count)].iter().sum();
                    self.singles = self.singles.saturating_sub(replies);
                    let mut bytes = 0;
                    for out in self.queue.drain(..replies) {
                        bytes += out.payload.len() as u64;
                        tracing::trace!(target: CONNECTION, peer = %out.destination, len = out.payload.len(), "send");
                        tracing::trace!(target: CONNECTION, peer = %out.destination, outcome = "replied", "stop");
                    }
                    counters.sent(bytes);
                    counters.finished(Outcome::Replied, replies as u64);
                }
                Poll::Ready(Err(error)) if spans[0].is_some() => {
                    // A run the kernel would not take: its datagrams go out one
                    // by one, in this flush.
                    self.refused_run(&error, covers[0], index);
                }
                Poll::Ready(result) => {
                    let out = self.queue.pop_front().expect("the queue is not empty");
                    self.singles = self.singles.saturating_sub(1);
                    counters.finished(Outcome::SendFailed, 1);
                    tracing::trace!(target: CONNECTION, peer = %out.destination, outcome = "send_failed", "stop");
                    if let Some(suppressed) = self.log.allow() {
                        let error = match result {
                            Err(error) => error.to_string(),
                            Ok(_) => "nothing sent".to_owned(),
                        };
                        tracing::warn!(
                            target: CONNECTION,
                            peer = %out.destination,
                            len = out.payload.len(),
                            error,
                            suppressed,
                            "send failed; reply dropped"
                        );
                    }
                }
            }
            progress = true;
        }
        progress
    }

    /// The kernel refused the GSO run of `run` replies at the front.
    fn refused_run(&mut self, error: &io::Error, run: usize, index: usize) {
        let front = &self.queue[0];
        let size = front.payload.len();
        match error.raw_os_error() {
            // The device cannot segment (no checksum offload), or the route
            // goes through IPsec: GSO is of no use on this socket.
            Some(EIO) => {
                tracing::info!(target: LISTENER, listener = index, %error, "GSO refused by the device; sending datagrams one by one from now on");
                self.transmit_segments = 1;
            }
            // The segment is larger than the path carries unfragmented:
            // keep runs below it for this address family.
            Some(EMSGSIZE | EINVAL) => {
                let cap = if is_v4(front.destination) {
                    &mut self.segment_v4
                } else {
                    &mut self.segment_v6
                };
                *cap = (*cap).min(size.saturating_sub(1));
                tracing::debug!(target: LISTENER, listener = index, %error, size, "GSO segment too long for the path; lowering the segment size");
            }
            _ => {
                tracing::debug!(target: LISTENER, listener = index, %error, "GSO run refused; sending its datagrams one by one");
            }
        }
        self.singles = self.singles.max(run);
    }

    /// How many replies from `queue[start]` on can go as one GSO transmit:
    /// same peer and source, same size no larger than the path's segment,
    /// the last possibly shorter but never empty, so the kernel splits the
    /// run back into exactly these datagrams.
    fn run_from(&self, start: usize) -> usize {
        if self.transmit_segments < 2 || start < self.singles {
            return 1;
        }
        let first = &self.queue[start];
        let size = first.payload.len();
        let cap = if is_v4(first.destination) {
            self.segment_v4
        } else {
            self.segment_v6
        };
        if size == 0 || size > cap {
            return 1;
        }
        let limit = self
            .transmit_segments
            .min(GSO_MAX_BYTES / size)
            .min((GSO_BUFFER - self.gso_buffer.len()) / size);
        let mut run = 1;
        while run < limit {
            let Some(next) = self.queue.get(start + run) else {
                break;
            };
            let len = next.payload.len();
            if next.destination != first.destination
                || next.src_ip != first.src_ip
                || next.tos != first.tos
                || len > size
                || len == 0
            {
                break;
            }
            run += 1;
            if len < size {
                break;
            }
        }
        run
    }
}

/// Whether datagrams to `destination` travel over IPv4.
fn is_v4(destination: SocketAddr) -> bool {
    destination.ip().to_canonical().is_ipv4()
}
