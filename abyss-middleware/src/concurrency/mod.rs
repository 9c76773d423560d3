//! Drop datagrams while N requests are already in flight.
//!
//! tower's [`ConcurrencyLimit`] makes
//! callers *wait* for a slot: its `poll_ready` is pending while the limit is
//! reached. That is right for HTTP, where a connection can wait; for UDP,
//! waiting means the server stops reading and the kernel drops at random
//! once its buffer fills. This layer instead stays ready and drops the
//! datagram that finds the limit reached, at once, counted as `overloaded`
//! ([`DropReason::Overloaded`](crate::DropReason::Overloaded)), so the
//! datagrams that are served are fresh ones.
//!
//! It behaves like tower's `ConcurrencyLimitLayer` under tower's
//! `LoadShedLayer` (which also fails with `Overloaded` instead of waiting),
//! without the semaphore, the waker registration and the boxed acquire
//! future that stack needs.
//!
//! The limit counts requests from `call` until their response future
//! completes or is dropped.
//!
//! # Example
//!
//! ```
//! use abyss_middleware::ConcurrencyShedLayer;
//! use abyss_middleware::concurrency::ConcurrencyShed;
//! use tower::ServiceBuilder;
//!
//! let service: ConcurrencyShed<_> = ServiceBuilder::new()
//!     .layer(ConcurrencyShedLayer::new(256))
//!     .service_fn(|_: ()| async { Ok::<_, std::convert::Infallible>(()) });
//! assert_eq!(service.in_flight(), 0);
//! ```
//!
//! [`ConcurrencyLimit`]: https://docs.rs/tower/0.5/tower/limit/concurrency/struct.ConcurrencyLimit.html

mod future;
mod layer;
mod service;

pub use future::ResponseFuture;
pub use layer::ConcurrencyShedLayer;
pub use service::ConcurrencyShed;
