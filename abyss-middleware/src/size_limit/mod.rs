//! Drop datagrams whose payload is over a size limit (the original's
//! `max_packet_size`).
//!
//! The check runs before the inner service: an oversized datagram never
//! reaches it, gets no reply, fails with [`Dropped`](crate::Dropped)
//! ([`DropReason::TooLarge`](crate::DropReason::TooLarge)), and is traced as
//! `packet_too_large` (target `abyss::listener`, with peer and size).

mod layer;
mod service;

pub use layer::SizeLimitLayer;
pub use service::SizeLimit;
