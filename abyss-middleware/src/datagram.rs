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
    ///
    /// # Example
    ///
    /// ```
    /// use std::net::SocketAddr;
    /// use abyss_middleware::Datagram;
    ///
    /// struct Packet { from: SocketAddr, bytes: Vec<u8> }
    ///
    /// impl Datagram for Packet {
    ///     fn peer(&self) -> SocketAddr { self.from }
    ///     fn local(&self) -> SocketAddr { "192.0.2.53:53".parse().unwrap() }
    ///     fn payload_len(&self) -> usize { self.bytes.len() }
    /// }
    ///
    /// let packet = Packet { from: "192.0.2.1:5000".parse().unwrap(), bytes: vec![0; 12] };
    /// assert_eq!(packet.peer().port(), 5000);
    /// ```
    fn peer(&self) -> SocketAddr;
    /// The address it was sent to.
    ///
    /// # Example
    ///
    /// ```
    /// use std::net::SocketAddr;
    /// use abyss_middleware::Datagram;
    ///
    /// struct Packet { from: SocketAddr, bytes: Vec<u8> }
    ///
    /// impl Datagram for Packet {
    ///     fn peer(&self) -> SocketAddr { self.from }
    ///     fn local(&self) -> SocketAddr { "192.0.2.53:53".parse().unwrap() }
    ///     fn payload_len(&self) -> usize { self.bytes.len() }
    /// }
    ///
    /// let packet = Packet { from: "192.0.2.1:5000".parse().unwrap(), bytes: vec![0; 12] };
    /// assert_eq!(packet.local().port(), 53);
    /// ```
    fn local(&self) -> SocketAddr;
    /// The payload's length in bytes.
    ///
    /// # Example
    ///
    /// ```
    /// use std::net::SocketAddr;
    /// use abyss_middleware::Datagram;
    ///
    /// struct Packet { from: SocketAddr, bytes: Vec<u8> }
    ///
    /// impl Datagram for Packet {
    ///     fn peer(&self) -> SocketAddr { self.from }
    ///     fn local(&self) -> SocketAddr { "192.0.2.53:53".parse().unwrap() }
    ///     fn payload_len(&self) -> usize { self.bytes.len() }
    /// }
    ///
    /// let packet = Packet { from: "192.0.2.1:5000".parse().unwrap(), bytes: vec![0; 12] };
    /// assert_eq!(packet.payload_len(), 12);
    /// ```
    fn payload_len(&self) -> usize;

    /// When the datagram was received. Rate limits are measured at arrival
    /// and traced latency counts from it. The default reads tokio's clock
    /// (so paused test time applies); a server that stamps its requests
    /// returns the stamp and saves layers a clock read each.
    ///
    /// # Example
    ///
    /// ```
    /// use std::net::SocketAddr;
    /// use std::time::Instant;
    /// use abyss_middleware::Datagram;
    ///
    /// /// Stamped when read off the socket.
    /// struct Stamped { from: SocketAddr, len: usize, at: Instant }
    ///
    /// impl Datagram for Stamped {
    ///     fn peer(&self) -> SocketAddr { self.from }
    ///     fn local(&self) -> SocketAddr { "192.0.2.53:53".parse().unwrap() }
    ///     fn payload_len(&self) -> usize { self.len }
    ///     fn received_at(&self) -> Instant { self.at }
    /// }
    ///
    /// let at = Instant::now();
    /// let packet = Stamped { from: "192.0.2.1:5000".parse().unwrap(), len: 1, at };
    /// assert_eq!(packet.received_at(), at);
    /// ```
    fn received_at(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }
}
