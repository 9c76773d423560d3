use std::time::Duration;

use tower::BoxError;
use tracing::{Level, Span};

use crate::targets::CONNECTION;
use crate::{Datagram, drop_reason};

/// Makes the span a datagram is handled in.
///
/// # Example
///
/// ```
/// use abyss_middleware::TraceLayer;
/// use abyss_middleware::trace::MakeSpan;
/// use tracing::Span;
/// # #[derive(Debug)] struct Req;
/// # impl abyss_middleware::Datagram for Req {
/// #     fn peer(&self) -> std::net::SocketAddr { ([192, 0, 2, 1], 1).into() }
/// #     fn local(&self) -> std::net::SocketAddr { ([192, 0, 2, 2], 2).into() }
/// #     fn payload_len(&self) -> usize { 0 }
/// # }
///
/// /// A span named after the protocol, at INFO.
/// #[derive(Clone)]
/// struct Dns;
///
/// impl MakeSpan<Req> for Dns {
///     fn make_span(&mut self, request: &Req) -> Span {
///         use abyss_middleware::Datagram;
///         tracing::info_span!("dns", peer = %request.peer())
///     }
/// }
///
/// let layer = TraceLayer::new().make_span_with(Dns);
/// # let _ = layer;
/// ```
pub trait MakeSpan<R> {
    /// The span for `request`.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::Datagram;
    /// use abyss_middleware::trace::{DefaultMakeSpan, MakeSpan};
    /// # #[derive(Debug)] struct Req;
    /// # impl abyss_middleware::Datagram for Req {
    /// #     fn peer(&self) -> std::net::SocketAddr { ([192, 0, 2, 1], 1).into() }
    /// #     fn local(&self) -> std::net::SocketAddr { ([192, 0, 2, 2], 2).into() }
    /// #     fn payload_len(&self) -> usize { 0 }
    /// # }
    ///
    /// let span = DefaultMakeSpan::new().make_span(&Req);
    /// # let _ = span;
    /// ```
    fn make_span(&mut self, request: &R) -> Span;
}

impl<R, F: FnMut(&R) -> Span> MakeSpan<R> for F {
    fn make_span(&mut self, request: &R) -> Span {
        self(request)
    }
}

/// Called when a datagram reaches the layer, inside its span.
///
/// # Example
///
/// ```
/// use abyss_middleware::TraceLayer;
/// use tracing::Span;
/// # #[derive(Debug)] struct Req;
/// # impl abyss_middleware::Datagram for Req {
/// #     fn peer(&self) -> std::net::SocketAddr { ([192, 0, 2, 1], 1).into() }
/// #     fn local(&self) -> std::net::SocketAddr { ([192, 0, 2, 2], 2).into() }
/// #     fn payload_len(&self) -> usize { 0 }
/// # }
///
/// let layer = TraceLayer::new().on_request(|_: &Req, _: &Span| tracing::trace!("datagram in"));
/// # let _ = layer;
/// ```
pub trait OnRequest<R> {
    /// Called with the request, before the inner service sees it.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::trace::OnRequest;
    /// use tracing::Span;
    /// # #[derive(Debug)] struct Req;
    /// # impl abyss_middleware::Datagram for Req {
    /// #     fn peer(&self) -> std::net::SocketAddr { ([192, 0, 2, 1], 1).into() }
    /// #     fn local(&self) -> std::net::SocketAddr { ([192, 0, 2, 2], 2).into() }
    /// #     fn payload_len(&self) -> usize { 0 }
    /// # }
    ///
    /// let mut seen = 0;
    /// let mut count = |_: &Req, _: &Span| seen += 1;
    /// count.on_request(&Req, &Span::none());
    /// assert_eq!(seen, 1);
    /// ```
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
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use abyss_middleware::TraceLayer;
/// use tracing::Span;
///
/// // Log the reply size of a service answering `Option<Bytes>`.
/// let layer = TraceLayer::new().on_reply(|reply: &Option<bytes::Bytes>, latency: Duration, _: &Span| {
///     let len = reply.as_ref().map_or(0, |r| r.len());
///     tracing::info!(len, latency_us = latency.as_micros() as u64, "answered");
/// });
/// # let _ = layer;
/// ```
pub trait OnReply<T> {
    /// Called with the response and how long it took.
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use abyss_middleware::trace::OnReply;
    /// use tracing::Span;
    ///
    /// let hook = |reply: &&str, latency: Duration, _: &Span| assert_eq!((*reply, latency.as_millis()), ("ok", 3));
    /// hook.on_reply(&"ok", Duration::from_millis(3), &Span::none());
    /// ```
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
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use abyss_middleware::{TraceLayer, drop_reason};
/// use tracing::Span;
///
/// // Count drops by reason, log other errors at ERROR.
/// let layer = TraceLayer::new().on_failure(|error: &tower::BoxError, _: Duration, _: &Span| {
///     match drop_reason(&**error) {
///         Some(reason) => tracing::debug!(reason = reason.as_str(), "dropped"),
///         None => tracing::error!(%error, "handler failed"),
///     }
/// });
/// # let _ = layer;
/// ```
pub trait OnFailure {
    /// Called with the error and how long it took.
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use abyss_middleware::trace::{DefaultOnFailure, OnFailure};
    /// use tracing::Span;
    ///
    /// let error: tower::BoxError = "boom".into();
    /// DefaultOnFailure.on_failure(&error, Duration::from_millis(1), &Span::none()); // logs at WARN
    /// ```
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
///
/// # Example
///
/// ```
/// use abyss_middleware::TraceLayer;
/// use abyss_middleware::trace::DefaultMakeSpan;
/// use tracing::Level;
///
/// let layer = TraceLayer::new().make_span_with(DefaultMakeSpan::new().level(Level::INFO));
/// # let _ = layer;
/// ```
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
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::trace::DefaultMakeSpan;
    ///
    /// let make_span = DefaultMakeSpan::new(); // `datagram` spans at DEBUG
    /// # let _ = make_span;
    /// ```
    pub fn new() -> Self {
        Self {
            level: Level::DEBUG,
        }
    }

    /// Spans at `level`.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::trace::DefaultMakeSpan;
    ///
    /// // Spans visible with RUST_LOG=info.
    /// let make_span = DefaultMakeSpan::new().level(tracing::Level::INFO);
    /// # let _ = make_span;
    /// ```
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
///
/// # Example
///
/// ```
/// use abyss_middleware::TraceLayer;
/// use abyss_middleware::trace::DefaultOnRequest;
///
/// // What `TraceLayer::new()` uses; `()` does the same.
/// let layer = TraceLayer::new().on_request(DefaultOnRequest);
/// # let _ = layer;
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultOnRequest;

impl<R> OnRequest<R> for DefaultOnRequest {
    fn on_request(&mut self, _request: &R, _span: &Span) {}
}

/// Logs `reply` with `latency_us` at `DEBUG`.
///
/// # Example
///
/// ```
/// use abyss_middleware::TraceLayer;
///
/// // Keep the span, drop the `reply` event.
/// let quiet = TraceLayer::new().on_reply(());
/// # let _ = quiet;
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultOnReply;

impl<T> OnReply<T> for DefaultOnReply {
    fn on_reply(self, _response: &T, latency: Duration, _span: &Span) {
        tracing::debug!(target: CONNECTION, latency_us = latency.as_micros() as u64, "reply");
    }
}

/// Logs `dropped` with the reason at `DEBUG` for a layer's drop decision,
/// and `failed` with the error at `WARN` for anything else.
///
/// # Example
///
/// ```
/// use abyss_middleware::TraceLayer;
/// use abyss_middleware::trace::DefaultOnFailure;
///
/// let layer = TraceLayer::new().on_failure(DefaultOnFailure);
/// # let _ = layer;
/// ```
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
