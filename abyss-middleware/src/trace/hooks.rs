use std::time::Duration;

use tower::BoxError;
use tracing::{Level, Span};

use crate::targets::CONNECTION;
use crate::{Datagram, drop_reason};

/// Makes the span a datagram is handled in.
pub trait MakeSpan<R> {
    /// The span for `request`.
    fn make_span(&mut self, request: &R) -> Span;
}

impl<R, F: FnMut(&R) -> Span> MakeSpan<R> for F {
    fn make_span(&mut self, request: &R) -> Span {
        self(request)
    }
}

/// Called when a datagram reaches the layer, inside its span.
pub trait OnRequest<R> {
    /// Called with the request, before the inner service sees it.
    fn on_request(&mut self, request: &R, span: &Span);
}

impl<R, F: FnMut(&R, &Span)> OnRequest<R> for F {
    fn on_request(&mut self, request: &R, span: &Span) {
        self(request, span)
    }
}

impl<R> OnRequest<R> for () {
    fn on_request(&mut self, _request: &R, _span: &Span) {}
}

/// Called when the inner service answers, inside the datagram's span.
pub trait OnReply<T> {
    /// Called with the response and how long it took.
    fn on_reply(self, response: &T, latency: Duration, span: &Span);
}

impl<T, F: FnOnce(&T, Duration, &Span)> OnReply<T> for F {
    fn on_reply(self, response: &T, latency: Duration, span: &Span) {
        self(response, latency, span)
    }
}

impl<T> OnReply<T> for () {
    fn on_reply(self, _response: &T, _latency: Duration, _span: &Span) {}
}

/// Called when the inner service fails, inside the datagram's span.
pub trait OnFailure {
    /// Called with the error and how long it took.
    fn on_failure(self, error: &BoxError, latency: Duration, span: &Span);
}

impl<F: FnOnce(&BoxError, Duration, &Span)> OnFailure for F {
    fn on_failure(self, error: &BoxError, latency: Duration, span: &Span) {
        self(error, latency, span)
    }
}

impl OnFailure for () {
    fn on_failure(self, _error: &BoxError, _latency: Duration, _span: &Span) {}
}

/// The default span: `datagram` with `peer`, `local` and `len`, at `DEBUG`
/// unless set otherwise.
#[derive(Debug, Clone, Copy)]
pub struct DefaultMakeSpan {
    level: Level,
}

impl Default for DefaultMakeSpan {
    fn default() -> Self {
        Self::new()
    }
}

impl DefaultMakeSpan {
    /// Spans at `DEBUG`.
    pub fn new() -> Self {
        Self {
            level: Level::DEBUG,
        }
    }

    /// Spans at `level`.
    pub fn level(mut self, level: Level) -> Self {
        self.level = level;
        self
    }
}

macro_rules! datagram_span {
    ($level:expr, $request:expr) => {
        match $level {
            Level::ERROR => tracing::error_span!(target: CONNECTION, "datagram", peer = %$request.peer(), local = %$request.local(), len = $request.payload_len()),
            Level::WARN => tracing::warn_span!(target: CONNECTION, "datagram", peer = %$request.peer(), local = %$request.local(), len = $request.payload_len()),
            Level::INFO => tracing::info_span!(target: CONNECTION, "datagram", peer = %$request.peer(), local = %$request.local(), len = $request.payload_len()),
            Level::DEBUG => tracing::debug_span!(target: CONNECTION, "datagram", peer = %$request.peer(), local = %$request.local(), len = $request.payload_len()),
            Level::TRACE => tracing::trace_span!(target: CONNECTION, "datagram", peer = %$request.peer(), local = %$request.local(), len = $request.payload_len()),
        }
    };
}

impl<R: Datagram> MakeSpan<R> for DefaultMakeSpan {
    fn make_span(&mut self, request: &R) -> Span {
        datagram_span!(self.level, request)
    }
}

/// Logs nothing; the span itself marks the request.
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultOnRequest;

impl<R> OnRequest<R> for DefaultOnRequest {
    fn on_request(&mut self, _request: &R, _span: &Span) {}
}

/// Logs `reply` with `latency_us` at `DEBUG`.
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultOnReply;

impl<T> OnReply<T> for DefaultOnReply {
    fn on_reply(self, _response: &T, latency: Duration, _span: &Span) {
        tracing::debug!(target: CONNECTION, latency_us = latency.as_micros() as u64, "reply");
    }
}

/// Logs `dropped` with the reason at `DEBUG` for a layer's drop decision,
/// and `failed` with the error at `WARN` for anything else.
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultOnFailure;

impl OnFailure for DefaultOnFailure {
    fn on_failure(self, error: &BoxError, latency: Duration, _span: &Span) {
        let latency_us = latency.as_micros() as u64;
        match drop_reason(&**error) {
            Some(reason) => {
                tracing::debug!(target: CONNECTION, reason = reason.as_str(), latency_us, "dropped")
            }
            None => {
                tracing::warn!(target: CONNECTION, error = %error, latency_us, "failed")
            }
        }
    }
}
