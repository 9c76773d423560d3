//! A tracing span per datagram, with hooks on request, reply and failure.
//!
//! Modelled on tower-http's `TraceLayer`: [`MakeSpan`], [`OnRequest`],
//! [`OnReply`] and [`OnFailure`] are traits with blanket impls for closures,
//! so any hook can be a closure. The defaults make a `datagram` span at
//! `DEBUG` with the peer, local address and length, log nothing on request,
//! log `reply` with the latency in microseconds (counted from
//! [`Datagram::received_at`](crate::Datagram::received_at), so time spent
//! waiting for the service counts too), and log failures (a
//! drop, as [`drop_reason`](crate::drop_reason) finds it, at `DEBUG` with its
//! reason, any other error at
//! `WARN`). Payloads are never logged.
//!
//! Everything the inner service does is inside the span, so a handler's own
//! events carry the peer.
//!
//! # Example
//!
//! ```
//! use abyss_middleware::TraceLayer;
//! use abyss_middleware::trace::DefaultMakeSpan;
//! use tower::ServiceBuilder;
//! # #[derive(Debug)] struct Req;
//! # impl abyss_middleware::Datagram for Req {
//! #     fn peer(&self) -> std::net::SocketAddr { ([192, 0, 2, 1], 1).into() }
//! #     fn local(&self) -> std::net::SocketAddr { ([192, 0, 2, 2], 2).into() }
//! #     fn payload_len(&self) -> usize { 0 }
//! # }
//!
//! // `datagram` spans at INFO, replies not logged, failures as by default.
//! let service = ServiceBuilder::new()
//!     .layer(
//!         TraceLayer::new()
//!             .make_span_with(DefaultMakeSpan::new().level(tracing::Level::INFO))
//!             .on_reply(()),
//!     )
//!     .service_fn(|_: Req| async { Ok::<_, std::convert::Infallible>(()) });
//! # let _ = service;
//! ```

mod future;
mod hooks;
mod layer;
mod service;

pub use future::ResponseFuture;
pub use hooks::{
    DefaultMakeSpan, DefaultOnFailure, DefaultOnReply, DefaultOnRequest, MakeSpan, OnFailure,
    OnReply, OnRequest,
};
pub use layer::TraceLayer;
pub use service::Trace;
