use std::net::SocketAddr;
use std::time::Instant;

/// What per-peer layers need to know about a request: who sent it, where
/// to, and how long its payload is.
///
/// `abyss::Request` implements it; implement it for your own request type
/// to use these layers elsewhere.
///
/// # Example
///
/// ```
/// use std::net::SocketAddr;
/// use abyss_middleware::Datagram;
///
/// struct Packet { from: SocketAddr, to: SocketAddr, bytes: Vec<u8> }
///
/// impl Datagram for Packet {
///     fn peer(&self) -> SocketAddr { self.from }
///     fn local(&self) -> SocketAddr { self.to }
///     fn payload_len(&self) -> usize { self.bytes.len() }
/// }
/// ```
pub trait Datagram {
    /// The address the datagram came from.
    fn peer(&self) -> SocketAddr;
    /// The address it was sent to.
    fn local(&self) -> SocketAddr;
    /// The payload's length in bytes.
    fn payload_len(&self) -> usize;

    /// When the datagram was received. Rate limits are measured at arrival
    /// and traced latency counts from it. The default reads tokio's clock
    /// (so paused test time applies); a server that stamps its requests
    /// returns the stamp and saves layers a clock read each.
    fn received_at(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }
}
