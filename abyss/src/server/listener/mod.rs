//! The listener driver: one task per transport, reading batches, calling the
//! service under backpressure, sending replies, draining on shutdown.
//!
//! Receiving lives in `receive`, sending in `send`, service futures in
//! `in_flight`; this module keeps the loop that ties them together.

mod drop_log;
mod in_flight;
pub(crate) mod placement;
mod receive;
mod send;

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;
use tower::{BoxError, Service};

use self::drop_log::{DropLog, LogGate};
use self::in_flight::{Done, Finished, InFlight, InFlightSet, Timed, drop_value, panic_message};
use self::placement::Placement;
use self::receive::{Batch, Received, Receiver};
use self::send::{Outbox, Outgoing};
use super::DrainReport;
use super::policy::answerable;
use super::stats::{Counters, Outcome};
use crate::middleware::drop_reason;
use crate::middleware::targets::{CONNECTION, LISTENER};
use crate::transport::Transport;
use crate::{IntoReply, Request, SendHandle};

/// Datagrams a listener handles in one poll before it yields to the runtime.
const BUDGET: usize = 256;
/// Most datagrams received, or transmits sent, in one transport call (a
/// transport may move fewer: see `Transport::max_receive_batch`).
const MAX_BATCH: usize = 32;

/// Tells a listener to stop reading and drain; knows its socket.
#[derive(Debug, Default)]
pub(crate) struct Control {
    draining: AtomicBool,
    /// The socket was handed to another process, which reads it now: stop
    /// reading, but leave the socket as it is (it is shared).
    handed_over: AtomicBool,
    waker: AtomicWaker,
    /// The listener's transport, as its supervisor last started it.
    transport: std::sync::Mutex<Option<Arc<dyn Transport>>>,
}

impl Control {
    pub(crate) fn drain(&self) {
        self.draining.store(true, Ordering::Release);
        self.waker.wake();
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Drains without touching the socket, which another process shares.
    pub(crate) fn hand_over(&self) {
        self.handed_over.store(true, Ordering::Release);
        self.drain();
    }

    fn is_handed_over(&self) -> bool {
        self.handed_over.load(Ordering::Acquire)
    }

    pub(crate) fn set_transport(&self, transport: Arc<dyn Transport>) {
        *self.transport.lock().unwrap_or_else(|e| e.into_inner()) = Some(transport);
    }

    pub(crate) fn transport(&self) -> Option<Arc<dyn Transport>> {
        self.transport
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// What a listener needs besides its service.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) index: usize,
    /// This listener's share of `max_in_flight`.
    pub(crate) max_in_flight: usize,
    pub(crate) max_datagram_size: usize,
    pub(crate) dispatch: crate::Dispatch,
    pub(crate) shutdown_timeout: Duration,
    /// Live listeners of the server, this one included while it runs.
    pub(crate) live: Arc<AtomicUsize>,
    /// When each listener of the server was last busy handling.
    pub(crate) busy: Arc<placement::Busy>,
}

/// The service's readiness for the next datagram.
enum Readiness {
    /// Not polled since the last call.
    Unknown,
    Ready,
    /// `poll_ready` failed: the next datagram is dropped with this error.
    Failed(BoxError),
    /// `poll_ready` panicked: the next datagram is dropped as panicked.
    Panicked(String),
}

/// Counts a listener as live while it exists, panics included.
struct Live(Arc<AtomicUsize>);

impl Live {
    fn new(live: Arc<AtomicUsize>) -> Self {
        live.fetch_add(1, Ordering::AcqRel);
        Self(live)
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
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
    receiver: Receiver,
    pending: VecDeque<Received>,
    in_flight: InFlightSet<F>,
    /// Service futures running on the runtime's workers.
    spawned: tokio::task::JoinSet<Done>,
    /// Whether new service futures run here or on the workers.
    placement: Placement,
    outbox: Outbox,
    panic_log: LogGate,
    drop_log: DropLog,
    /// This listener's handle on the handling-time histogram.
    #[cfg(feature = "metrics")]
    handling: super::metrics::Handling,
    _live: Live,
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
        // Every socket on the port gets a copy of a broadcast or multicast
        // datagram: only the group's first listener handles them.
        let receiver = Receiver::new(&*transport, settings.max_datagram_size, settings.index);
        let outbox = Outbox::new(&*transport);
        counters[settings.index].attach(&transport);
        Ok(Self {
            local,
            service,
            control,
            counters,
            readiness: Readiness::Unknown,
            paused: false,
            receiver,
            pending: VecDeque::new(),
            in_flight: InFlightSet::new(),
            spawned: tokio::task::JoinSet::new(),
            placement: Placement::new(settings.dispatch, settings.busy.clone(), settings.index),
            outbox,
            panic_log: LogGate::default(),
            drop_log: DropLog::default(),
            #[cfg(feature = "metrics")]
            handling: Default::default(),
            _live: Live::new(settings.live.clone()),
            settings,
            transport,
        })
    }

    fn counters(&self) -> &Counters {
        &self.counters[self.settings.index]
    }

    /// Datagrams received and not finished.
    fn occupancy(&self) -> usize {
        self.pending.len() + self.in_flight.len() + self.spawned.len() + self.outbox.len()
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

        // The socket takes no new datagrams from now on: bound to one
        // address, the system gives them to the group's other sockets or
        // refuses them; bound to a wildcard address, it drops them, counted
        // as kernel drops. What is queued is counted when it closes. A
        // socket handed over is left alone: its new owner reads it.
        let handed_over = self.control.is_handed_over();
        if handed_over {
            tracing::debug!(target: LISTENER, listener = index, "listener handed over: it stops reading");
        } else if let Err(error) = self.transport.stop_receiving() {
            tracing::debug!(target: LISTENER, listener = index, %error, "could not stop receiving before closing");
        }
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
        let counters = &self.counters[index];
        let unread = if handed_over {
            // What is queued is the new owner's to read.
            counters.detach(&self.transport);
            0
        } else {
            close(&mut self.receiver, &self.transport, counters)
        };
        tracing::info!(
            target: LISTENER,
            listener = index,
            local = %self.local,
            drained = report.drained,
            aborted = report.aborted,
            unread,
            "listener stop"
        );
        report
    }

    /// Drops everything still in flight, counting it as aborted.
    fn abort(&mut self) -> u64 {
        let aborted = self.occupancy() as u64;
        // Datagrams still pending never started: no `stop` for them.
        self.pending.clear();
        for peer in self.in_flight.peers() {
            tracing::trace!(target: CONNECTION, peer = %peer, outcome = "aborted", "stop");
        }
        // Each future's destructor runs under a catch.
        self.in_flight.clear();
        // Dropping the set aborts its tasks. Their peers are not known
        // here: no `stop` for them.
        self.spawned = tokio::task::JoinSet::new();
        for peer in self.outbox.clear() {
            tracing::trace!(target: CONNECTION, peer = %peer, outcome = "aborted", "stop");
        }
        self.counters().finished(Outcome::Aborted, aborted);
        aborted
    }

    /// One round of work. With `reading`, never finishes; without, finishes
    /// once nothing is left in flight.
    fn poll_serve(&mut self, cx: &mut Context<'_>, reading: bool) -> Poll<()> {
        let mut budget = BUDGET;
        loop {
            let mut progress = false;
            let measuring = self.placement.measuring();
            let started = measuring.then(Instant::now);
            let mut dispatched = 0u32;

            while let Poll::Ready(done) = self.in_flight.poll_next(cx) {
                self.finish(done);
                progress = true;
            }
            let polled_in_flight = started.map(|at| at.elapsed());

            while let Poll::Ready(Some(joined)) = self.spawned.poll_join_next(cx) {
                match joined {
                    Ok(done) => {
                        if measuring {
                            self.placed(done.busy, 1);
                        }
                        self.finish(done);
                    }
                    // Its panic was caught while polled: this one came from
                    // its destructor, after it finished.
                    Err(error) if error.is_panic() => {
                        let peer = self.local;
                        self.panicked(peer, &panic_message(&*error.into_panic()));
                    }
                    Err(_) => self.count(self.local, Outcome::Aborted),
                }
                progress = true;
            }

            progress |= self.outbox.poll_flush(
                cx,
                &*self.transport,
                &self.counters[self.settings.index],
                self.settings.index,
            );

            let dispatching = measuring.then(Instant::now);
            while !self.pending.is_empty() && budget > 0 {
                if self.poll_service_ready(cx).is_pending() {
                    break;
                }
                let received = self.pending.pop_front().expect("pending is not empty");
                dispatched += 1;
                tracing::trace!(target: CONNECTION, peer = %received.peer, len = received.payload.len(), "start");
                match std::mem::replace(&mut self.readiness, Readiness::Unknown) {
                    Readiness::Ready => self.dispatch(received),
                    Readiness::Unknown => unreachable!("poll_service_ready leaves a result"),
                    Readiness::Failed(error) => {
                        self.count_because(received.peer, Outcome::HandlerError, Some(&error));
                        let _ = drop_value(error);
                    }
                    Readiness::Panicked(message) => self.panicked(received.peer, &message),
                }
                budget -= 1;
                progress = true;
            }

            if let (Some(polled), Some(dispatching)) = (polled_in_flight, dispatching)
                && dispatched > 0
                && !self.placement.spawning()
            {
                // Inline: what handling held the listener for, both polling
                // what was waiting and starting what was new.
                self.placed(polled + dispatching.elapsed(), dispatched);
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

    /// Polls the service until it is ready, fails or panics. The result is
    /// kept until the next datagram uses it: a readiness error or panic
    /// drops exactly one datagram.
    fn poll_service_ready(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if matches!(self.readiness, Readiness::Unknown) {
            let service = &mut self.service;
            self.readiness = match catch_unwind(AssertUnwindSafe(|| service.poll_ready(cx))) {
                Ok(polled) => match ready!(polled) {
                    Ok(()) => {
                        tracing::trace!(target: CONNECTION, "ready");
                        Readiness::Ready
                    }
                    Err(error) => Readiness::Failed(error.into()),
                },
                Err(panic) => Readiness::Panicked(panic_message(&*panic)),
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
        let want = self.receiver.want(room, *budget);
        match self.receiver.poll_batch(cx, &*self.transport, want) {
            Poll::Pending => false,
            Poll::Ready(Batch::Buffers(n)) => {
                tracing::trace!(target: LISTENER, listener = self.settings.index, buffers = n, "listener receiving");
                let counters = &self.counters[self.settings.index];
                let pending = &mut self.pending;
                let taken = self.receiver.accept(n, counters, |r| pending.push_back(r));
                *budget = budget.saturating_sub(taken.max(1));
                true
            }
            Poll::Ready(Batch::Error(error)) => {
                *budget = budget.saturating_sub(1);
                self.counters().receive_error();
                self.receiver.log_error(&error);
                true
            }
        }
    }

    fn dispatch(&mut self, received: Received) {
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
        )
        .with_arrival(received.arrival);
        let service = &mut self.service;
        let future = match catch_unwind(AssertUnwindSafe(|| service.call(request))) {
            Ok(future) => future,
            Err(panic) => return self.panicked(received.peer, &panic_message(&*panic)),
        };
        let in_flight = InFlight {
            future,
            peer: received.peer,
            reply_from: received.reply_from,
            received_at: received.at,
        };
        if self.placement.spawning() {
            self.spawned.spawn(Timed {
                inner: in_flight,
                busy: Duration::ZERO,
            });
            return;
        }
        // Polled once in a slot of the in-flight set: a service that
        // answers at once (most do) leaves it empty again; one that has to
        // wait stays. Either way nothing is allocated once the set has
        // grown to the listener's concurrency.
        if let Some(done) = self.in_flight.start(in_flight) {
            self.finish(done);
        }
    }

    fn finish(&mut self, done: Done) {
        #[cfg(feature = "metrics")]
        self.counters[self.settings.index].handled(&mut self.handling, done.received_at.elapsed());
        #[cfg(not(feature = "metrics"))]
        let _ = done.received_at;
        match done.finished {
            Finished::Reply(Some(payload), tos) => {
                if answerable(done.peer) {
                    self.outbox.push(Outgoing {
                        destination: done.peer,
                        src_ip: done.reply_from,
                        tos,
                        payload,
                    });
                } else {
                    self.count(done.peer, Outcome::RefusedDestination);
                }
            }
            Finished::Reply(None, _) => self.count(done.peer, Outcome::NoReply),
            Finished::Failed(error) => {
                let outcome = match drop_reason(&*error) {
                    Some(reason) => Outcome::Layer(reason),
                    None => Outcome::HandlerError,
                };
                let cause: &dyn std::fmt::Display = &error;
                let cause = matches!(outcome, Outcome::HandlerError).then_some(cause);
                self.count_because(done.peer, outcome, cause);
                if let Err(message) = drop_value(error) {
                    tracing::error!(target: CONNECTION, panic = message, "an error's destructor panicked");
                }
            }
            Finished::Panicked(message) => self.panicked(done.peer, &message),
        }
    }

    fn panicked(&mut self, peer: SocketAddr, message: &str) {
        self.count(peer, Outcome::Panicked);
        if let Some(suppressed) = self.panic_log.allow() {
            tracing::error!(target: CONNECTION, peer = %peer, panic = message, suppressed, "handler panicked; datagram dropped");
        }
    }

    /// Records handling time for the choice of where handlers run.
    fn placed(&mut self, took: Duration, datagrams: u32) {
        if let Some(spawning) = self.placement.record(took, datagrams) {
            tracing::debug!(
                target: LISTENER,
                listener = self.settings.index,
                on_workers = spawning,
                "handlers moved"
            );
        }
    }

    /// Counts one datagram's outcome, with its `stop` event and, for a
    /// drop, the rate-limited line that explains it.
    fn count(&mut self, peer: SocketAddr, outcome: Outcome) {
        self.count_because(peer, outcome, None);
    }

    /// [`count`](Self::count), with the service's error that caused a drop.
    fn count_because(
        &mut self,
        peer: SocketAddr,
        outcome: Outcome,
        cause: Option<&dyn std::fmt::Display>,
    ) {
        tracing::trace!(target: CONNECTION, peer = %peer, outcome = outcome.as_str(), "stop");
        self.counters[self.settings.index].finished(outcome, 1);
        self.drop_log
            .note(self.settings.index, peer, outcome, cause);
    }
}

/// Closes a listener's socket with nothing uncounted: reads what is still
/// queued on it (it stopped receiving new datagrams), counts it as
/// `unread_at_close`, and folds its kernel drop count into the listener's.
/// Returns how many datagrams were left unread.
fn close(receiver: &mut Receiver, transport: &Arc<dyn Transport>, counters: &Counters) -> u64 {
    let unread = receiver.read_leftovers(&**transport);
    counters.unread_at_close(unread);
    counters.detach(transport);
    unread
}

/// Closes the socket of a listener that died: makes it stop receiving, and
/// counts what it left queued and what the kernel dropped on it.
pub(crate) fn close_after_failure(
    transport: &Arc<dyn Transport>,
    counters: &Counters,
    settings: &Settings,
) -> u64 {
    // The transport may be what failed: a panic here ends nothing.
    let closed = catch_unwind(AssertUnwindSafe(|| {
        let _ = transport.stop_receiving();
        let mut receiver = Receiver::new(&**transport, settings.max_datagram_size, settings.index);
        close(&mut receiver, transport, counters)
    }));
    closed.unwrap_or_else(|panic| {
        tracing::error!(target: LISTENER, listener = settings.index, panic = panic_message(&*panic), "closing a failed listener's socket panicked");
        counters.forget(transport);
        0
    })
}
