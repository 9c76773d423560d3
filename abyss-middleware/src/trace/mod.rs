//! A tracing span per datagram, with hooks on request, reply and failure.
//!
//! Modelled on tower-http's `TraceLayer`: [`MakeSpan`], [`OnRequest`],
//! [`OnReply`] and [`OnFailure`] are traits with blanket impls for closures,
//! so any hook can be a closure. The defaults make a `datagram` span at
//! `DEBUG` with the peer, local address and length, log nothing on request,
//! log `reply` with the latency in microseconds (counted from
//! [`Datagram::received_at`](crate::Datagram::received_at), so time spent
//! waiting for the service counts too), and log failures (a
//! [`Dropped`](crate::Dropped) at `DEBUG` with its reason, any other error at
//! `WARN`). Payloads are never logged.
//!
//! Everything the inner service does is inside the span, so a handler's own
//! events carry the peer.

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
