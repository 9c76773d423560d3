//! Service futures in flight: each carries what is needed to answer it,
//! and turns a panic (while polled, or while dropped) into an outcome
//! instead of ending the listener.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
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

/// A service future that had to wait, in the box it was first polled in.
pub(super) struct Staged<F>(pub(super) Pin<Box<Option<InFlight<F>>>>);

impl<F> Staged<F> {
    /// The peer whose datagram this is, while it is unfinished.
    pub(super) fn peer(&self) -> Option<SocketAddr> {
        self.0.as_ref().as_pin_ref().map(|f| f.peer)
    }
}

impl<F, R, E> Future for Staged<F>
where
    F: Future<Output = Result<R, E>>,
    R: IntoReply,
    E: Into<BoxError>,
{
    type Output = Done;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Done> {
        let Some(in_flight) = self.0.as_mut().as_pin_mut() else {
            // Emptied by a panic while dropping, after it finished: never
            // polled again by the in-flight set.
            return Poll::Pending;
        };
        let mut done = ready!(in_flight.poll(cx));
        // Drop the finished future now rather than with the task node; a
        // panic in its destructor is the datagram's outcome.
        if let Err(message) = drop_caught(self.0.as_mut()) {
            done.finished = Finished::Panicked(message);
        }
        Poll::Ready(done)
    }
}

impl<F> Drop for Staged<F> {
    fn drop(&mut self) {
        // An unfinished future dropped at abort: its destructor must not
        // take the listener down with it.
        let _ = drop_caught(self.0.as_mut());
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
