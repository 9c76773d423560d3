//! The listener driver: one task per transport, reading batches, calling the
//! service under backpressure, sending replies, draining on shutdown.

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::io::IoSliceMut;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use futures_util::task::AtomicWaker;
use pin_project_lite::pin_project;
use tower::{BoxError, Service};

use super::DrainReport;
use super::stats::{Counters, Outcome};
use crate::middleware::drop_reason;
use crate::transport::{RecvMeta, Transmit, Transport};
use crate::{IntoReply, Request, SendHandle};

use crate::middleware::targets::{CONNECTION, LISTENER};

/// Datagrams a listener handles in one poll before it yields to the runtime.
const BUDGET: usize = 256;
/// Most datagrams received or sent in one transport call.
const MAX_BATCH: usize = 32;
/// Receive scratch space a listener keeps (slots of `max_datagram_size`,
/// or of 64 KiB when the transport coalesces with GRO).
const SCRATCH_BYTES: usize = 1 << 20;
/// Payloads are copied into shared blocks of this size, so a small datagram
/// costs no allocation of its own.
const ARENA_BYTES: usize = 64 * 1024;
/// A GRO buffer holds up to 64 KiB of coalesced datagrams.
const GRO_SLOT: usize = 65_535;
/// The most payload one GSO transmit carries.
const GSO_MAX_BYTES: usize = 65_000;
/// Replies copied into one send buffer per flush, for GSO.
const GSO_BUFFER: usize = 256 * 1024;

/// Tells a listener to stop reading and drain.
#[derive(Debug, Default)]
pub(crate) struct Control {
    draining: AtomicBool,
    waker: AtomicWaker,
}

impl Control {
    pub(crate) fn drain(&self) {
        self.draining.store(true, Ordering::Release);
        self.waker.wake();
    }

    fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}

/// What a listener needs besides its service.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) index: usize,
    /// This listener's share of `max_in_flight`.
    pub(crate) max_in_flight: usize,
    pub(crate) max_datagram_size: usize,
    pub(crate) shutdown_timeout: Duration,
}

/// A received datagram waiting for the service to be ready.
struct Received {
    peer: SocketAddr,
    dst_ip: Option<IpAddr>,
    payload: Bytes,
    at: Instant,
}

/// A reply waiting for the socket.
struct Outgoing {
    destination: SocketAddr,
    src_ip: Option<IpAddr>,
    payload: Bytes,
}

pin_project! {
    /// A service future, with what is needed to answer it, that turns a
    /// panic into an outcome.
    struct InFlight<F> {
        #[pin]
        future: F,
        peer: SocketAddr,
        dst_ip: Option<IpAddr>,
        received_at: Instant,
    }
}

/// A service future that had to wait, in the box it was first polled in.
struct Staged<F>(Pin<Box<Option<InFlight<F>>>>);

impl<F, R, E> Future for Staged<F>
where
    F: Future<Output = Result<R, E>>,
    R: IntoReply,
    E: Into<BoxError>,
{
    type Output = Done;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Done> {
        let in_flight = self
            .0
            .as_mut()
            .as_pin_mut()
            .expect("a staged future is never empty");
        let done = ready!(in_flight.poll(cx));
        // Drop the finished future now rather than with the task node.
        self.0.as_mut().set(None);
        Poll::Ready(done)
    }
}

enum Finished {
    Reply(Option<Bytes>),
    Failed(BoxError),
    Panicked(String),
}

struct Done {
    peer: SocketAddr,
    dst_ip: Option<IpAddr>,
    received_at: Instant,
    finished: Finished,
}

impl<F, R, E> Future for InFlight<F>
where
    F: Future<Output = Result<R, E>>,
    R: IntoReply,
    E: Into<BoxError>,
{
    type Output = Done;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Done> {
        let this = self.project();
        let future = this.future;
        let finished = match catch_unwind(AssertUnwindSafe(|| future.poll(cx))) {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(Ok(response))) => Finished::Reply(response.into_reply()),
            Ok(Poll::Ready(Err(error))) => Finished::Failed(error.into()),
            Err(panic) => Finished::Panicked(panic_message(&*panic)),
        };
        Poll::Ready(Done {
            peer: *this.peer,
            dst_ip: *this.dst_ip,
            received_at: *this.received_at,
            finished,
        })
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// Lets a warning through at most once a second, counting the rest.
#[derive(Debug, Default)]
struct LogGate {
    next: Option<Instant>,
    suppressed: u64,
}

impl LogGate {
    /// `Some(suppressed since the last one)` when this one may be logged.
    fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.next {
            Some(next) if now < next => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.next = Some(now + Duration::from_secs(1));
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// Whether a reply may be sent to `peer`: never to port 0, an unspecified,
/// broadcast or multicast address (a spoofed source there turns the server
/// into an amplifier).
pub(crate) fn answerable(peer: SocketAddr) -> bool {
    if peer.port() == 0 {
        return false;
    }
    match peer.ip() {
        IpAddr::V4(ip) => !(ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast()),
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(v4) => answerable(SocketAddr::new(IpAddr::V4(v4), peer.port())),
            None => !(ip.is_unspecified() || ip.is_multicast()),
        },
    }
}

/// The service's readiness for the next datagram.
enum Readiness {
    /// Not polled since the last call.
    Unknown,
    Ready,
    /// `poll_ready` failed: the next datagram is dropped with this error.
    Failed(BoxError),
}

pub(crate) struct Listener<S, F> {
    transport: Arc<dyn Transport>,
    local: SocketAddr,
    service: S,
    control: Arc<Control>,
    counters: Arc<[Counters]>,
    settings: Settings,
    /// What `poll_ready` said, until a datagram uses it.
    readiness: Readiness,
    /// Reads are paused at the in-flight cap (counted once per pause).
    paused: bool,
    scratch: Vec<u8>,
    /// Bytes per receive buffer in `scratch`.
    slot: usize,
    /// Datagrams one receive buffer may hold (GRO), 1 without.
    receive_segments: usize,
    metas: Vec<RecvMeta>,
    batch: usize,
    max_transmit: usize,
    /// Datagrams one transmit may carry (GSO), 1 without or once the path
    /// has refused it.
    transmit_segments: usize,
    /// Where replies to one peer are laid end to end for GSO.
    gso_buffer: Vec<u8>,
    arena: BytesMut,
    pending: VecDeque<Received>,
    in_flight: FuturesUnordered<Staged<F>>,
    /// Where a new service future is first polled; see `dispatch`.
    staging: Pin<Box<Option<InFlight<F>>>>,
    outbox: VecDeque<Outgoing>,
    recv_log: LogGate,
    send_log: LogGate,
    panic_log: LogGate,
}

impl<S, R, E> Listener<S, S::Future>
where
    S: Service<Request, Response = R, Error = E> + Send + 'static,
    S::Future: Send + 'static,
    R: IntoReply + Send + 'static,
    E: Into<BoxError> + Send + 'static,
{
    pub(crate) fn new(
        transport: Arc<dyn Transport>,
        service: S,
        control: Arc<Control>,
        counters: Arc<[Counters]>,
        settings: Settings,
    ) -> std::io::Result<Self> {
        let local = transport.local_addr()?;
        let receive_segments = transport.max_receive_segments().max(1);
        let slot = if receive_segments > 1 {
            GRO_SLOT
        } else {
            settings.max_datagram_size
        };
        let transmit_segments = transport.max_transmit_segments().max(1);
        let batch = transport
            .max_receive_batch()
            .clamp(1, MAX_BATCH)
            .min((SCRATCH_BYTES / slot).max(1));
        let max_transmit = transport.max_transmit_batch().clamp(1, MAX_BATCH);
        counters[settings.index].attach(&transport);
        Ok(Self {
            transport,
            local,
            service,
            control,
            counters,
            settings,
            readiness: Readiness::Unknown,
            paused: false,
            scratch: vec![0; batch * slot],
            slot,
            receive_segments,
            transmit_segments,
            gso_buffer: if transmit_segments > 1 {
                Vec::with_capacity(GSO_BUFFER)
            } else {
                Vec::new()
            },
            metas: vec![RecvMeta::default(); batch],
            batch,
            max_transmit,
            arena: BytesMut::new(),
            pending: VecDeque::new(),
            in_flight: FuturesUnordered::new(),
            staging: Box::pin(None),
            outbox: VecDeque::new(),
            recv_log: LogGate::default(),
            send_log: LogGate::default(),
            panic_log: LogGate::default(),
        })
    }

    fn counters(&self) -> &Counters {
        &self.counters[self.settings.index]
    }

    /// Datagrams received and not finished.
    fn occupancy(&self) -> usize {
        self.pending.len() + self.in_flight.len() + self.outbox.len()
    }

    /// Serves until told to drain, then drains up to the shutdown timeout.
    pub(crate) async fn run(mut self) -> DrainReport {
        let index = self.settings.index;
        tracing::info!(target: LISTENER, listener = index, local = %self.local, "listener start");
        tracing::debug!(target: LISTENER, listener = index, "listener ready");
        poll_fn(|cx| {
            self.control.waker.register(cx.waker());
            if self.control.is_draining() {
                return Poll::Ready(());
            }
            self.poll_serve(cx, true)
        })
        .await;

        let outstanding = self.occupancy() as u64;
        tracing::debug!(target: LISTENER, listener = index, in_flight = outstanding, "listener draining");
        let deadline = tokio::time::sleep(self.settings.shutdown_timeout);
        tokio::pin!(deadline);
        let drained_all = poll_fn(|cx| {
            if self.poll_serve(cx, false).is_ready() {
                return Poll::Ready(true);
            }
            deadline.as_mut().poll(cx).map(|()| false)
        })
        .await;
        let aborted = if drained_all { 0 } else { self.abort() };
        let report = DrainReport {
            drained: outstanding - aborted,
            aborted,
        };
        // The socket closes with this task: keep what it dropped.
        self.counters().detach(&self.transport);
        tracing::info!(
            target: LISTENER,
            listener = index,
            local = %self.local,
            drained = report.drained,
            aborted = report.aborted,
            "listener stop"
        );
        report
    }

    /// Drops everything still in flight, counting it as aborted.
    fn abort(&mut self) -> u64 {
        let aborted = self.occupancy() as u64;
        self.pending.clear();
        self.in_flight.clear();
        self.outbox.clear();
        self.counters().finished(Outcome::Aborted, aborted);
        aborted
    }

    /// One round of work. With `reading`, never finishes; without, finishes
    /// once nothing is left in flight.
    fn poll_serve(&mut self, cx: &mut Context<'_>, reading: bool) -> Poll<()> {
        let mut budget = BUDGET;
        loop {
            let mut progress = false;

            while let Poll::Ready(Some(done)) = self.in_flight.poll_next_unpin(cx) {
                self.finish(done);
                progress = true;
            }

            progress |= self.poll_flush(cx);

            while !self.pending.is_empty() && budget > 0 {
                if self.poll_service_ready(cx).is_pending() {
                    break;
                }
                let received = self.pending.pop_front().expect("pending is not empty");
                match std::mem::replace(&mut self.readiness, Readiness::Unknown) {
                    Readiness::Ready => self.dispatch(received, cx),
                    Readiness::Unknown => unreachable!("poll_service_ready leaves a result"),
                    Readiness::Failed(error) => {
                        tracing::debug!(
                            target: CONNECTION,
                            peer = %received.peer,
                            error = %error,
                            "service not ready; datagram dropped"
                        );
                        self.count(received.peer, Outcome::HandlerError);
                    }
                }
                budget -= 1;
                progress = true;
            }

            if reading && self.pending.is_empty() && budget > 0 {
                progress |= self.poll_receive(cx, &mut budget);
            }

            if !reading && self.occupancy() == 0 {
                return Poll::Ready(());
            }
            if budget == 0 {
                // Let other tasks run; come back straight away.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            if !progress {
                return Poll::Pending;
            }
        }
    }

    /// Polls the service until it is ready or fails. Either result is kept
    /// until the next datagram uses it: a readiness error drops exactly one
    /// datagram.
    fn poll_service_ready(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if matches!(self.readiness, Readiness::Unknown) {
            self.readiness = match ready!(self.service.poll_ready(cx)) {
                Ok(()) => {
                    tracing::trace!(target: CONNECTION, "ready");
                    Readiness::Ready
                }
                Err(error) => Readiness::Failed(error.into()),
            };
        }
        Poll::Ready(())
    }

    /// Reads a batch once the service is ready and there is room in flight.
    /// Returns whether anything happened.
    fn poll_receive(&mut self, cx: &mut Context<'_>, budget: &mut usize) -> bool {
        let room = self.settings.max_in_flight.saturating_sub(self.occupancy());
        if room == 0 {
            if !self.paused {
                self.paused = true;
                self.counters().read_paused();
                tracing::trace!(target: LISTENER, listener = self.settings.index, reason = "in-flight limit", "listener waiting");
            }
            return false;
        }
        self.paused = false;
        // Backpressure: a service that is not ready leaves datagrams in the
        // kernel. A failing one gets the datagram anyway, which is then
        // dropped and counted in the dispatch loop.
        if self.poll_service_ready(cx).is_pending() {
            return false;
        }

        let slot = self.slot;
        // With GRO one buffer may hold many datagrams: the cap can then be
        // passed by at most one buffer's worth.
        let want = room
            .div_ceil(self.receive_segments)
            .min(self.batch)
            .min(*budget);
        let mut bufs: [IoSliceMut<'_>; MAX_BATCH] =
            std::array::from_fn(|_| IoSliceMut::new(&mut []));
        for (buf, chunk) in bufs
            .iter_mut()
            .zip(self.scratch.chunks_mut(slot))
            .take(want)
        {
            *buf = IoSliceMut::new(chunk);
        }
        let polled = self
            .transport
            .poll_recv(cx, &mut bufs[..want], &mut self.metas[..want]);
        match polled {
            Poll::Pending => false,
            Poll::Ready(Ok(n)) => {
                *budget = budget.saturating_sub(n.max(1));
                tracing::trace!(target: LISTENER, listener = self.settings.index, buffers = n, "listener receiving");
                self.accept(n);
                true
            }
            Poll::Ready(Err(error)) => {
                *budget = budget.saturating_sub(1);
                self.counters().receive_error();
                if let Some(suppressed) = self.recv_log.allow() {
                    tracing::warn!(
                        target: LISTENER,
                        listener = self.settings.index,
                        error = %error,
                        suppressed,
                        "recv_error"
                    );
                }
                true
            }
        }
    }

    /// Takes the datagrams in the first `n` receive buffers, splitting GRO
    /// buffers into their datagrams.
    fn accept(&mut self, n: usize) {
        // One clock read per batch; tokio's clock, so paused test time
        // applies to the layers that measure from it.
        let at = tokio::time::Instant::now().into_std();
        let limit = self.settings.max_datagram_size;
        let slot = self.slot;
        let counters = &self.counters[self.settings.index];
        // Count every datagram received before any is finished, so that a
        // stats snapshot never sees an outcome without its receipt.
        let datagrams: usize = self.metas[..n].iter().map(datagrams_in).sum();
        counters.received(datagrams as u64);
        for i in 0..n {
            let meta = self.metas[i];
            if meta.truncated {
                tracing::debug!(target: CONNECTION, peer = %meta.peer, len = meta.len, limit, "datagram truncated; dropped");
                counters.finished(Outcome::Truncated, 1);
                continue;
            }
            let buffer = &self.scratch[i * slot..i * slot + meta.len];
            let stride = if meta.stride == 0 {
                meta.len
            } else {
                meta.stride
            };
            let segments = buffer.chunks(stride.max(1));
            // An empty datagram is a datagram too.
            let empty = (meta.len == 0).then_some(&buffer[..0]);
            for data in segments.chain(empty) {
                if data.len() > limit {
                    // Only a GRO buffer, which is larger than the limit, can
                    // hold one: treat it as the kernel would have.
                    tracing::debug!(target: CONNECTION, peer = %meta.peer, len = data.len(), limit, "datagram over max_datagram_size; dropped");
                    counters.finished(Outcome::Truncated, 1);
                    continue;
                }
                if self.arena.capacity() < data.len() {
                    self.arena.reserve(ARENA_BYTES.max(data.len()));
                }
                self.arena.extend_from_slice(data);
                let payload = self.arena.split().freeze();
                tracing::trace!(target: CONNECTION, peer = %meta.peer, len = data.len(), "recv");
                self.pending.push_back(Received {
                    peer: meta.peer,
                    dst_ip: meta.dst_ip,
                    payload,
                    at,
                });
            }
        }
    }

    fn dispatch(&mut self, received: Received, cx: &mut Context<'_>) {
        tracing::trace!(target: CONNECTION, peer = %received.peer, len = received.payload.len(), "start");
        let local = SocketAddr::new(
            received.dst_ip.unwrap_or(self.local.ip()),
            self.local.port(),
        );
        let request = Request::received(
            received.peer,
            local,
            received.payload,
            received.at,
            SendHandle::new(&self.transport),
        );
        let service = &mut self.service;
        let future = match catch_unwind(AssertUnwindSafe(|| service.call(request))) {
            Ok(future) => future,
            Err(panic) => return self.panicked(received.peer, &panic_message(&*panic)),
        };
        // Poll once in place: a service that answers at once (most do) costs
        // no allocation. Only a future that has to wait moves, with its box,
        // into the in-flight set, and a new box takes its place.
        self.staging.as_mut().set(Some(InFlight {
            future,
            peer: received.peer,
            dst_ip: received.dst_ip,
            received_at: received.at,
        }));
        let polled = self
            .staging
            .as_mut()
            .as_pin_mut()
            .expect("just staged")
            .poll(cx);
        match polled {
            Poll::Ready(done) => {
                self.staging.as_mut().set(None);
                self.finish(done);
            }
            Poll::Pending => {
                let waiting = std::mem::replace(&mut self.staging, Box::pin(None));
                self.in_flight.push(Staged(waiting));
            }
        }
    }

    fn finish(&mut self, done: Done) {
        #[cfg(feature = "metrics")]
        self.counters().handled(done.received_at.elapsed());
        #[cfg(not(feature = "metrics"))]
        let _ = done.received_at;
        match done.finished {
            Finished::Reply(Some(payload)) => {
                if answerable(done.peer) {
                    self.outbox.push_back(Outgoing {
                        destination: done.peer,
                        src_ip: done.dst_ip,
                        payload,
                    });
                } else {
                    self.count(done.peer, Outcome::RefusedDestination);
                }
            }
            Finished::Reply(None) => self.count(done.peer, Outcome::NoReply),
            Finished::Failed(error) => match drop_reason(&*error) {
                Some(reason) => self.count(done.peer, Outcome::Layer(reason)),
                None => {
                    tracing::debug!(target: CONNECTION, peer = %done.peer, error = %error, "handler error; datagram dropped");
                    self.counters().finished(Outcome::HandlerError, 1);
                }
            },
            Finished::Panicked(message) => self.panicked(done.peer, &message),
        }
    }

    fn panicked(&mut self, peer: SocketAddr, message: &str) {
        self.counters().finished(Outcome::Panicked, 1);
        if let Some(suppressed) = self.panic_log.allow() {
            tracing::error!(target: CONNECTION, peer = %peer, panic = message, suppressed, "handler panicked; datagram dropped");
        }
    }

    fn count(&self, peer: SocketAddr, outcome: Outcome) {
        tracing::trace!(target: CONNECTION, peer = %peer, outcome = outcome.as_str(), "stop");
        self.counters().finished(outcome, 1);
    }

    /// Sends queued replies until the socket pushes back. Returns whether
    /// anything was sent or dropped.
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        while !self.outbox.is_empty() {
            // Plan up to `max_transmit` transmits; with GSO a transmit
            // carries a run of replies to one peer (same size, the last may
            // be shorter), laid end to end in the GSO buffer.
            let mut covers = [1usize; MAX_BATCH];
            let mut spans: [Option<(usize, usize)>; MAX_BATCH] = [None; MAX_BATCH];
            let mut count = 0;
            let mut next = 0;
            self.gso_buffer.clear();
            while count < self.max_transmit && next < self.outbox.len() {
                let run = self.gso_run(next);
                if run > 1 {
                    let start = self.gso_buffer.len();
                    for out in self.outbox.range(next..next + run) {
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
                let out = &self.outbox[first];
                first += covers[k];
                match spans[k] {
                    Some((start, end)) => {
                        let mut transmit =
                            Transmit::new(out.destination, &self.gso_buffer[start..end])
                                .with_src_ip(out.src_ip);
                        transmit.segment_size = Some(out.payload.len());
                        transmit
                    }
                    None => Transmit::new(out.destination, &out.payload).with_src_ip(out.src_ip),
                }
            });
            let polled = self.transport.poll_send(cx, &transmits[..count]);
            match polled {
                Poll::Pending => break,
                Poll::Ready(Ok(sent)) if sent > 0 => {
                    let replies: usize = covers[..sent.min(count)].iter().sum();
                    for out in self.outbox.drain(..replies) {
                        tracing::trace!(target: CONNECTION, peer = %out.destination, len = out.payload.len(), "send");
                    }
                    self.counters().finished(Outcome::Replied, replies as u64);
                }
                Poll::Ready(Err(error)) if spans[0].is_some() && gso_refused(&error) => {
                    // This path cannot segment (no checksum offload on the
                    // device, say): send one datagram per transmit from now on.
                    tracing::debug!(target: LISTENER, listener = self.settings.index, %error, "GSO refused; sending datagrams one by one");
                    self.transmit_segments = 1;
                }
                Poll::Ready(result) => {
                    let failed = covers[0];
                    let peer = self.outbox[0].destination;
                    self.outbox.drain(..failed);
                    self.counters().finished(Outcome::SendFailed, failed as u64);
                    if let Some(suppressed) = self.send_log.allow() {
                        let error = match result {
                            Err(error) => error.to_string(),
                            Ok(_) => "nothing sent".to_owned(),
                        };
                        tracing::warn!(
                            target: CONNECTION,
                            peer = %peer,
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

    /// How many replies from `outbox[start]` on can go as one GSO transmit:
    /// same peer and source, same size, the last possibly shorter.
    fn gso_run(&self, start: usize) -> usize {
        if self.transmit_segments < 2 {
            return 1;
        }
        let first = &self.outbox[start];
        let size = first.payload.len();
        if size == 0 {
            return 1;
        }
        let limit = self
            .transmit_segments
            .min(GSO_MAX_BYTES / size)
            .min((GSO_BUFFER - self.gso_buffer.len()) / size);
        let mut run = 1;
        while run < limit {
            let Some(next) = self.outbox.get(start + run) else {
                break;
            };
            if next.destination != first.destination
                || next.src_ip != first.src_ip
                || next.payload.len() > size
            {
                break;
            }
            run += 1;
            if next.payload.len() < size {
                break;
            }
        }
        run
    }
}

/// Whether a send error means the path cannot do GSO.
fn gso_refused(error: &std::io::Error) -> bool {
    matches!(error.raw_os_error(), Some(code) if code == 5 /* EIO */ || code == 22 /* EINVAL */)
}

/// How many datagrams a receive buffer holds.
fn datagrams_in(meta: &RecvMeta) -> usize {
    if meta.truncated || meta.len == 0 {
        return 1;
    }
    let stride = if meta.stride == 0 {
        meta.len
    } else {
        meta.stride
    };
    meta.len.div_ceil(stride)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_refused_to_sources_that_cannot_be_answered() {
        let cases = [
            ("127.0.0.1:53", true),
            ("[::1]:53", true),
            ("127.0.0.1:0", false),
            ("0.0.0.0:68", false),
            ("255.255.255.255:68", false),
            ("224.0.0.251:5353", false),
            ("[::]:53", false),
            ("[ff02::fb]:5353", false),
            ("[::ffff:255.255.255.255]:53", false),
            ("[::ffff:192.0.2.1]:53", true),
        ];
        for (addr, expected) in cases {
            assert_eq!(answerable(addr.parse().unwrap()), expected, "{addr}");
        }
    }

    #[test]
    fn the_log_gate_lets_one_warning_through_per_second() {
        let mut gate = LogGate::default();
        assert_eq!(gate.allow(), Some(0));
        assert_eq!(gate.allow(), None);
        assert_eq!(gate.allow(), None);
        gate.next = Some(Instant::now() - Duration::from_millis(1));
        assert_eq!(gate.allow(), Some(2));
    }
}
