use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use tower::{BoxError, Service};

use super::future::{Permit, ResponseFuture};

/// Drops requests while `max` are in flight; see the [module docs](super).
///
/// Generic over any request type. Clones share the counter.
#[derive(Debug, Clone)]
pub struct ConcurrencyShed<S> {
    inner: S,
    max: usize,
    in_flight: Arc<AtomicUsize>,
}

impl<S> ConcurrencyShed<S> {
    /// Wraps `inner` with a limit of `max` requests in flight.
    pub fn new(inner: S, max: usize) -> Self {
        Self::with_counter(inner, max, Arc::new(AtomicUsize::new(0)))
    }

    pub(crate) fn with_counter(inner: S, max: usize, in_flight: Arc<AtomicUsize>) -> Self {
        Self {
            inner,
            max,
            in_flight,
        }
    }

    /// Requests in flight now, across clones.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, R> Service<R> for ConcurrencyShed<S>
where
    S: Service<R>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is the inner service's; the limit is applied in `call`,
        // where a request over it is dropped instead of waiting.
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: R) -> Self::Future {
        let previous = self.in_flight.fetch_add(1, Ordering::AcqRel);
        if previous >= self.max {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return ResponseFuture::overloaded();
        }
        let permit = Permit::new(self.in_flight.clone());
        ResponseFuture::admitted(self.inner.call(request), permit)
    }
}
