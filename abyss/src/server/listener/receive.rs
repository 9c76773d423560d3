//! The receive side of a listener: scratch buffers, batch sizing, checking
//! what the transport reports, splitting GRO buffers, and copying payloads
//! into a shared arena.

use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::super::stats::{Counters, Outcome};
use super::MAX_BATCH;
use super::drop_log::{DropLog, LogGate};
use crate::middleware::targets::{CONNECTION, LISTENER};
use crate::transport::{RecvMeta, Transport};

/// Receive scratch space a listener keeps (slots of `max_datagram_size`,
/// or of 64 KiB when the transport coalesces with GRO).
const SCRATCH_BYTES: usize = 1 << 20;
/// Payloads are copied into shared blocks of this size, so a small datagram
/// costs no allocation of its own.
const ARENA_BYTES: usize = 64 * 1024;
/// A GRO buffer holds up to 64 KiB of coalesced datagrams.
const GRO_SLOT: usize = 65_535;
/// Failed receive calls in a row after which a listener pauses before the
/// next (a transport that fails at once, forever, must not spin a core).
const ERRORS_BEFORE_BACKOFF: u32 = 64;
/// The first pause after failures, doubled while they go on, up to
/// `MAX_BACKOFF`.
const MIN_BACKOFF: Duration = Duration::from_millis(1);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Datagrams read from a closing socket at most (its queue is bounded by
/// its buffer; this bounds a transport that never runs dry).
const MAX_UNREAD: u64 = 1 << 20;

/// A received datagram waiting for the service.
pub(super) struct Received {
    pub(super) peer: SocketAddr,
    /// The address it was sent to.
    pub(super) dst_ip: Option<IpAddr>,
    /// The address a reply is sent from.
    pub(super) reply_from: Option<IpAddr>,
    pub(super) payload: Bytes,
    pub(super) at: Instant,
    /// What the kernel said of its arrival.
    pub(super) arrival: crate::request::Arrival,
}

/// What one receive call gave.
pub(super) enum Batch {
    /// `n` buffers, checked.
    Buffers(usize),
    /// The transport failed (counted by the caller).
    Error(io::Error),
}

pub(super) struct Receiver {
    scratch: Vec<u8>,
    /// Bytes per receive buffer in `scratch`.
    slot: usize,
    /// Datagrams one receive buffer may hold (GRO), 1 without.
    segments: usize,
    metas: Vec<RecvMeta>,
    batch: usize,
    arena: BytesMut,
    max_datagram_size: usize,
    /// Whether this listener leaves broadcast and multicast copies to the
    /// group's first listener.
    skip_group_copies: bool,
    failures: u32,
    backoff: Option<Pin<Box<tokio::time::Sleep>>>,
    backoff_for: Duration,
    log: LogGate,
    drops: DropLog,
    /// The listener's index, for logs.
    index: usize,
}

impl Receiver {
    /// The receive side of listener `index`; every listener but the first
    /// leaves broadcast and multicast copies to the first.
    pub(super) fn new(transport: &dyn Transport, max_datagram_size: usize, index: usize) -> Self {
        let segments = transport.max_receive_segments().max(1);
        let slot = if segments > 1 {
            GRO_SLOT
        } else {
            max_datagram_size
        };
        let batch = transport
            .max_receive_batch()
            .clamp(1, MAX_BATCH)
            .min((SCRATCH_BYTES / slot).max(1));
        Self {
            scratch: vec![0; batch * slot],
            slot,
            segments,
            metas: vec![RecvMeta::default(); batch],
            batch,
            arena: BytesMut::new(),
            max_datagram_size,
            skip_group_copies: index > 0,
            failures: 0,
            backoff: None,
            backoff_for: MIN_BACKOFF,
            log: LogGate::default(),
            drops: DropLog::default(),
            index,
        }
    }

    /// How many buffers to ask for with `room` datagrams of room in flight
    /// and `budget` left this round. With GRO one buffer may hold many
    /// datagrams: the cap can then be passed by at most one buffer's worth.
    pub(super) fn want(&self, room: usize, budget: usize) -> usize {
        room.div_ceil(self.segments).min(self.batch).min(budget)
    }

    /// Receives up to `want` buffers, checking that the transport's answer
    /// describes buffers it was given. A transport that answers nonsense or
    /// fails on every call is paused, with a timer, instead of being polled
    /// in a busy loop.
    pub(super) fn poll_batch(
        &mut self,
        cx: &mut Context<'_>,
        transport: &dyn Transport,
        want: usize,
    ) -> Poll<Batch> {
        if let Some(sleep) = self.backoff.as_mut() {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.backoff = None;
        }
        let want = want.clamp(1, self.batch);
        let slot = self.slot;
        let mut bufs: [IoSliceMut<'_>; MAX_BATCH] =
            std::array::from_fn(|_| IoSliceMut::new(&mut []));
        for (buf, chunk) in bufs
            .iter_mut()
            .zip(self.scratch.chunks_mut(slot))
            .take(want)
        {
            *buf = IoSliceMut::new(chunk);
        }
        let polled = transport.poll_recv(cx, &mut bufs[..want], &mut self.metas[..want]);
        let error = match polled {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(n)) => match self.check(n, want) {
                Ok(()) => {
                    self.failures = 0;
                    self.backoff_for = MIN_BACKOFF;
                    return Poll::Ready(Batch::Buffers(n));
                }
                Err(error) => {
                    // Nonsense is not transient: pause at once.
                    self.failures = ERRORS_BEFORE_BACKOFF;
                    error
                }
            },
            Poll::Ready(Err(error)) => error,
        };
        self.failures = self.failures.saturating_add(1);
        if self.failures >= ERRORS_BEFORE_BACKOFF {
            let mut sleep = Box::pin(tokio::time::sleep(self.backoff_for));
            self.backoff_for = (self.backoff_for * 2).min(MAX_BACKOFF);
            // Register the timer's wake-up now.
            let _ = sleep.as_mut().poll(cx);
            self.backoff = Some(sleep);
        }
        Poll::Ready(Batch::Error(error))
    }

    /// Whether `n` buffers of `want` are a possible answer.
    fn check(&self, n: usize, want: usize) -> io::Result<()> {
        if n == 0 {
            return Err(invalid("the transport reported a receive of 0 datagrams"));
        }
        if n > want {
            return Err(invalid(
                "the transport reported more datagrams than buffers",
            ));
        }
        if self.metas[..n]
            .iter()
            .any(|m| m.len > self.slot || (m.stride > m.len && !m.truncated))
        {
            return Err(invalid(
                "the transport reported a datagram longer than its buffer",
            ));
        }
        Ok(())
    }

    /// Logs a receive error, at most once a second.
    pub(super) fn log_error(&mut self, error: &io::Error) {
        if let Some(suppressed) = self.log.allow() {
            tracing::warn!(target: LISTENER, listener = self.index, %error, suppressed, "recv_error");
        }
    }

    /// Takes the datagrams in the first `n` receive buffers, splitting GRO
    /// buffers into their datagrams, and hands each to `push`. Returns how
    /// many were taken (including the ones dropped here, counted).
    pub(super) fn accept(
        &mut self,
        n: usize,
        counters: &Counters,
        mut push: impl FnMut(Received),
    ) -> usize {
        // One clock read per batch; tokio's clock, so paused test time
        // applies to the layers that measure from it.
        let at = tokio::time::Instant::now().into_std();
        let limit = self.max_datagram_size;
        let slot = self.slot;
        let mut copies = 0;
        let mut datagrams = 0;
        let mut bytes = 0;
        for meta in &self.metas[..n] {
            if self.skip_group_copies && meta.is_group_addressed() {
                copies += meta.datagrams();
            } else {
                datagrams += meta.datagrams();
                bytes += meta.len;
            }
        }
        counters.group_copies_skipped(copies as u64);
        // Count every datagram received before any is finished, so that a
        // stats snapshot never sees an outcome without its receipt.
        counters.received(datagrams as u64, bytes as u64);
        for (i, meta) in self.metas[..n].iter().enumerate() {
            if self.skip_group_copies && meta.is_group_addressed() {
                continue;
            }
            if meta.truncated {
                counters.finished(Outcome::Truncated, 1);
                self.drops
                    .note(self.index, meta.peer, Outcome::Truncated, None);
                continue;
            }
            let buffer = &self.scratch[i * slot..i * slot + meta.len];
            let segments = buffer.chunks(meta.segment_size());
            // An empty datagram is a datagram too.
            let empty = (meta.len == 0).then_some(&buffer[..0]);
            for data in segments.chain(empty) {
                if data.len() > limit {
                    // Only a GRO buffer, which is larger than the limit, can
                    // hold one: treat it as the kernel would have.
                    counters.finished(Outcome::Truncated, 1);
                    self.drops
                        .note(self.index, meta.peer, Outcome::Truncated, None);
                    continue;
                }
                if self.arena.capacity() < data.len() {
                    self.arena.reserve(ARENA_BYTES.max(data.len()));
                }
                self.arena.extend_from_slice(data);
                let payload = self.arena.split().freeze();
                tracing::trace!(target: CONNECTION, peer = %meta.peer, len = data.len(), "recv");
                push(Received {
                    peer: meta.peer,
                    dst_ip: meta.dst_ip,
                    reply_from: super::super::policy::reply_source(meta),
                    payload,
                    at,
                    arrival: crate::request::Arrival {
                        interface: meta.interface,
                        tos: meta.tos,
                        timestamp: meta.timestamp,
                    },
                });
            }
        }
        datagrams
    }

    /// Reads what is still queued on a transport that stopped receiving,
    /// without waiting, and returns how many datagrams it held.
    pub(super) fn read_leftovers(&mut self, transport: &dyn Transport) -> u64 {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut unread = 0u64;
        let mut errors = 0;
        // Never wait for a backoff here.
        self.backoff = None;
        while unread < MAX_UNREAD && errors < ERRORS_BEFORE_BACKOFF {
            let want = self.batch;
            match self.poll_batch(&mut cx, transport, want) {
                Poll::Ready(Batch::Buffers(n)) => {
                    unread += self.metas[..n]
                        .iter()
                        .filter(|m| !(self.skip_group_copies && m.is_group_addressed()))
                        .map(|m| m.datagrams() as u64)
                        .sum::<u64>();
                }
                Poll::Ready(Batch::Error(_)) => {
                    errors += 1;
                    self.backoff = None;
                }
                Poll::Pending => break,
            }
        }
        unread
    }
}

fn invalid(message: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}
