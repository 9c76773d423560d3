//! Service futures in flight: each carries what is needed to answer it,
//! and turns a panic (while polled, or while dropped) into an outcome
//! instead of ending the listener.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use pin_project_lite::pin_project;
use tower::BoxError;

use crate::IntoReply;

pin_project! {
    /// A service future, with what is needed to answer it.
    pub(super) struct InFlight<F> {
        #[pin]
        pub(super) future: F,
        pub(super) peer: SocketAddr,
        pub(super) reply_from: Option<IpAddr>,
        pub(super) received_at: Instant,
    }
}

/// How handling a datagram ended.
pub(super) enum Finished {
    /// The reply, if any, and its TOS byte.
    Reply(Option<Bytes>, Option<u8>),
    Failed(BoxError),
    Panicked(String),
}

/// A finished datagram, with what is needed to answer it.
pub(super) struct Done {
    pub(super) peer: SocketAddr,
    pub(super) reply_from: Option<IpAddr>,
    pub(super) received_at: Instant,
    pub(super) finished: Finished,
    /// Time its polls took, when it ran on a worker (zero inline: the
    /// listener measures those itself).
    pub(super) busy: Duration,
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
            Ok(Poll::Ready(Ok(response))) => {
                let tos = response.tos();
                Finished::Reply(response.into_reply(), tos)
            }
            Ok(Poll::Ready(Err(error))) => Finished::Failed(error.into()),
            Err(panic) => Finished::Panicked(panic_message(&*panic)),
        };
        Poll::Ready(Done {
            peer: *this.peer,
            reply_from: *this.reply_from,
            received_at: *this.received_at,
            finished,
            busy: Duration::ZERO,
        })
    }
}

pin_project! {
    /// A service future run on the runtime's workers: it reports how long
    /// its polls took, so the listener can tell whether handlers are heavy.
    pub(super) struct Timed<F> {
        #[pin]
        pub(super) inner: InFlight<F>,
        pub(super) busy: Duration,
    }
}

impl<F, R, E> Future for Timed<F>
where
    F: Future<Output = Result<R, E>>,
    R: IntoReply,
    E: Into<BoxError>,
{
    type Output = Done;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Done> {
        let this = self.project();
        let start = Instant::now();
        let polled = this.inner.poll(cx);
        *this.busy += start.elapsed();
        polled.map(|mut done| {
            done.busy = *this.busy;
            done
        })
    }
}

/// The service futures of a listener that had to wait.
///
/// Like `FuturesUnordered`, but nothing is allocated per future once the
/// set has grown to the listener's concurrency: each slot keeps its box
/// and its waker for the next future. A slot's waker queues the slot and
/// wakes the listener; the listener polls the queued slots only.
pub(super) struct InFlightSet<F> {
    slots: Vec<Slot<F>>,
    /// Empty slots, to be used again.
    free: Vec<usize>,
    ready: Arc<ReadyQueue>,
    /// Slots taken from `ready`, still to poll.
    polling: Vec<usize>,
}

struct Slot<F> {
    future: Pin<Box<Option<InFlight<F>>>>,
    wake: Arc<SlotWake>,
    waker: Waker,
}

/// Slots woken since the listener last looked, and the listener's waker.
struct ReadyQueue {
    slots: Mutex<Vec<usize>>,
    listener: AtomicWaker,
}

struct SlotWake {
    index: usize,
    /// Already in the queue: not queued twice.
    queued: AtomicBool,
    ready: Arc<ReadyQueue>,
}

impl Wake for SlotWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            self.ready
                .slots
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(self.index);
            self.ready.listener.wake();
        }
    }
}

impl<F, R, E> InFlightSet<F>
where
    F: Future<Output = Result<R, E>>,
    R: IntoReply,
    E: Into<BoxError>,
{
    pub(super) fn new() -> Self {
        Self {
            slots: Vec::new(),
            free: Vec::new(),
            ready: Arc::new(ReadyQueue {
                slots: Mutex::new(Vec::new()),
                listener: AtomicWaker::new(),
            }),
            polling: Vec::new(),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Polls `future` once in a slot of the set: its outcome if it
    /// finished at once, or `None` and it stays until it does.
    pub(super) fn start(&mut self, future: InFlight<F>) -> Option<Done> {
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                let index = self.slots.len();
                let wake = Arc::new(SlotWake {
                    index,
                    queued: AtomicBool::new(false),
                    ready: self.ready.clone(),
                });
                self.slots.push(Slot {
                    future: Box::pin(None),
                    waker: Waker::from(wake.clone()),
                    wake,
                });
                index
            }
        };
        self.slots[index].future.as_mut().set(Some(future));
        self.poll_slot(index)
    }

    /// Polls slot `index`; empties it if its future finished.
    fn poll_slot(&mut self, index: usize) -> Option<Done> {
        let slot = &mut self.slots[index];
        slot.wake.queued.store(false, Ordering::Release);
        let future = slot.future.as_mut().as_pin_mut()?;
        let mut done = match future.poll(&mut Context::from_waker(&slot.waker)) {
            Poll::Ready(done) => done,
            Poll::Pending => return None,
        };
        // Dropped now; a panic in its destructor is the datagram's outcome.
        if let Err(message) = drop_caught(slot.future.as_mut()) {
            done.finished = Finished::Panicked(message);
        }
        self.free.push(index);
        Some(done)
    }

    /// The next future to finish among those woken.
    pub(super) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Done> {
        self.ready.listener.register(cx.waker());
        if self.polling.is_empty() {
            // Taken once per call: a future that wakes itself while polled
            // waits for the listener's next turn.
            std::mem::swap(
                &mut self.polling,
                &mut *self.ready.slots.lock().unwrap_or_else(|e| e.into_inner()),
            );
            self.polling.reverse();
        }
        while let Some(index) = self.polling.pop() {
            if let Some(done) = self.poll_slot(index) {
                return Poll::Ready(done);
            }
        }
        Poll::Pending
    }

    /// The peers of the futures in the set.
    pub(super) fn peers(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.slots
            .iter()
            .filter_map(|slot| slot.future.as_ref().as_pin_ref().map(|f| f.peer))
    }

    /// Drops every future in the set, catching panics in their
    /// destructors.
    pub(super) fn clear(&mut self) {
        for (index, slot) in self.slots.iter_mut().enumerate() {
            if slot.future.is_some() {
                let _ = drop_caught(slot.future.as_mut());
                self.free.push(index);
            }
        }
    }
}

impl<F> Drop for InFlightSet<F> {
    fn drop(&mut self) {
        // An unfinished future dropped with the listener: its destructor
        // must not take the listener down with it.
        for slot in &mut self.slots {
            let _ = drop_caught(slot.future.as_mut());
        }
    }
}

/// Empties `slot`, catching a panic in the destructor of what it held.
pub(super) fn drop_caught<T>(mut slot: Pin<&mut Option<T>>) -> Result<(), String> {
    catch_unwind(AssertUnwindSafe(|| slot.set(None))).map_err(|panic| panic_message(&*panic))
}

/// Drops `value`, catching a panic in its destructor.
pub(super) fn drop_value<T>(value: T) -> Result<(), String> {
    catch_unwind(AssertUnwindSafe(move || drop(value))).map_err(|panic| panic_message(&*panic))
}

pub(super) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}
