use std::task::{Context, Poll};

use tower::{BoxError, Service};

use crate::future::ResponseFuture;
use crate::targets::LISTENER;
use crate::{Datagram, DropReason};

/// Drops datagrams over a size limit; see the [module docs](super).
#[derive(Debug, Clone)]
pub struct SizeLimit<S> {
    inner: S,
    max_bytes: usize,
}

impl<S> SizeLimit<S> {
    /// Wraps `inner`, dropping payloads of more than `max_bytes`.
    pub fn new(inner: S, max_bytes: usize) -> Self {
        Self { inner, max_bytes }
    }

    /// The limit in bytes.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Unwraps the service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, R> Service<R> for SizeLimit<S>
where
    S: Service<R>,
    S::Error: Into<BoxError>,
    R: Datagram,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: R) -> Self::Future {
        let size = request.payload_len();
        if size > self.max_bytes {
            tracing::debug!(
                target: LISTENER,
                peer = %request.peer(),
                size,
                limit = self.max_bytes,
                "packet_too_large"
            );
            // The inner service's readiness is kept for the next request.
            return ResponseFuture::rejected(DropReason::TooLarge);
        }
        ResponseFuture::inner(self.inner.call(request))
    }
}
