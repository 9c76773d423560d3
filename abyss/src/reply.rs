use bytes::Bytes;

/// What a service's response turns into: the payload to send back to the
/// peer, or `None` for no reply.
///
/// Implemented for `Option<Bytes>` (the canonical response), `Bytes`,
/// `Vec<u8>`, `Option<Vec<u8>>`, `&'static [u8]`, `&'static str`, `String`
/// and `()` (never replies).
///
/// # Example
///
/// ```
/// use abyss::IntoReply;
///
/// assert_eq!(b"pong".to_vec().into_reply().as_deref(), Some(&b"pong"[..]));
/// assert_eq!(().into_reply(), None);
/// ```
pub trait IntoReply {
    /// The reply payload, if any.
    fn into_reply(self) -> Option<Bytes>;
}

impl IntoReply for Option<Bytes> {
    fn into_reply(self) -> Option<Bytes> {
        self
    }
}

impl IntoReply for Bytes {
    fn into_reply(self) -> Option<Bytes> {
        Some(self)
    }
}

impl IntoReply for Vec<u8> {
    fn into_reply(self) -> Option<Bytes> {
        Some(Bytes::from(self))
    }
}

impl IntoReply for Option<Vec<u8>> {
    fn into_reply(self) -> Option<Bytes> {
        self.map(Bytes::from)
    }
}

impl IntoReply for &'static [u8] {
    fn into_reply(self) -> Option<Bytes> {
        Some(Bytes::from_static(self))
    }
}

impl IntoReply for &'static str {
    fn into_reply(self) -> Option<Bytes> {
        Some(Bytes::from_static(self.as_bytes()))
    }
}

impl IntoReply for String {
    fn into_reply(self) -> Option<Bytes> {
        Some(Bytes::from(self))
    }
}

impl IntoReply for () {
    fn into_reply(self) -> Option<Bytes> {
        None
    }
}
