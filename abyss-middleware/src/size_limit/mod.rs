//! Drop datagrams whose payload is over a size limit (the original's
//! `max_packet_size`).
//!
//! The check runs before the inner service: an oversized datagram never
//! reaches it, gets no reply, fails with [`error::TooLarge`](crate::error::TooLarge)
//! (found by [`drop_reason`](crate::drop_reason) as
//! [`DropReason::TooLarge`](crate::DropReason::TooLarge)), and is traced as
//! `packet_too_large` (target `abyss::listener`, with peer and size).
//!
//! # Example
//!
//! ```
//! use abyss_middleware::SizeLimitLayer;
//! use abyss_middleware::size_limit::SizeLimit;
//! use tower::ServiceBuilder;
//! # #[derive(Debug)] struct Req;
//! # impl abyss_middleware::Datagram for Req {
//! #     fn peer(&self) -> std::net::SocketAddr { ([192, 0, 2, 1], 1).into() }
//! #     fn local(&self) -> std::net::SocketAddr { ([192, 0, 2, 2], 2).into() }
//! #     fn payload_len(&self) -> usize { 0 }
//! # }
//!
//! let service: SizeLimit<_> = ServiceBuilder::new()
//!     .layer(SizeLimitLayer::new(1232))
//!     .service_fn(|_: Req| async { Ok::<_, std::convert::Infallible>(()) });
//! assert_eq!(service.max_bytes(), 1232);
//! ```

mod layer;
mod service;

pub use crate::future::ResponseFuture;
pub use layer::SizeLimitLayer;
pub use service::SizeLimit;
