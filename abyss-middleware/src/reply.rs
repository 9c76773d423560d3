//! What a service may answer with.

use bytes::{Bytes, BytesMut};

/// What a service's response turns into: the payload to send back to the
/// peer, or `None` for no reply.
///
/// Implemented for `Bytes`, `BytesMut`, `Vec<u8>`, `String`,
/// `&'static [u8]` and `&'static str`, for an `Option` of any of them
/// (`None`: no reply; `Option<Bytes>` is the canonical response), and for
/// `()` (never replies). Layers that look at replies, such as the
/// [amplification guard](crate::AmplificationGuardLayer), measure them with
/// [`reply_len`](IntoReply::reply_len) before they are sent.
///
/// # Example
///
/// ```
/// use abyss_middleware::IntoReply;
///
/// assert_eq!(b"pong".to_vec().into_reply().as_deref(), Some(&b"pong"[..]));
/// assert_eq!(Some("pong").reply_len(), 4);
/// assert_eq!(None::<String>.into_reply(), None);
/// assert_eq!(().into_reply(), None);
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a UDP reply",
    label = "the service answers with `{Self}`",
    note = "a reply is `Option<Bytes>` (`None`: no reply), `Bytes`, `BytesMut`, `Vec<u8>`, `String`, `&'static [u8]`, `&'static str`, an `Option` of one of these, or `()` (never replies)"
)]
pub trait IntoReply {
    /// The bytes the reply would send; 0 for no reply.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::IntoReply;
    ///
    /// assert_eq!(String::from("pong").reply_len(), 4);
    /// assert_eq!(None::<Vec<u8>>.reply_len(), 0);
    /// ```
    fn reply_len(&self) -> usize;

    /// The reply payload, if any.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::IntoReply;
    ///
    /// assert_eq!(Some("pong").into_reply(), Some(bytes::Bytes::from_static(b"pong")));
    /// assert_eq!(().into_reply(), None);
    /// ```
    fn into_reply(self) -> Option<Bytes>;

    /// The TOS (IPv4) or traffic class (IPv6) byte to send the reply with,
    /// DSCP and ECN; `None` (the default) keeps the socket's. See
    /// [`Reply::with_tos`].
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::{IntoReply, Reply};
    ///
    /// assert_eq!(Reply::new("voice").with_tos(0xb8).tos(), Some(0xb8));
    /// assert_eq!("data".tos(), None);
    /// ```
    fn tos(&self) -> Option<u8> {
        None
    }
}

/// A reply with how to send it: its TOS or traffic class byte (DSCP and
/// ECN), for services that mark their traffic.
///
/// # Example
///
/// ```
/// use std::convert::Infallible;
/// use abyss_middleware::Reply;
///
/// /// Voice frames go out as DSCP EF (46), everything else unmarked.
/// async fn handle(voice: bool, payload: bytes::Bytes) -> Result<Reply, Infallible> {
///     let reply = Reply::new(payload);
///     Ok(if voice { reply.with_tos(46 << 2) } else { reply })
/// }
/// # let _ = handle;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    payload: Bytes,
    tos: Option<u8>,
}

impl Reply {
    /// A reply of `payload`, sent with the socket's TOS.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::{IntoReply, Reply};
    ///
    /// assert_eq!(Reply::new("pong").reply_len(), 4);
    /// ```
    pub fn new(payload: impl Into<Bytes>) -> Self {
        Self {
            payload: payload.into(),
            tos: None,
        }
    }

    /// Sends it with `tos` as its TOS or traffic class byte: DSCP in the
    /// upper six bits, ECN in the lower two.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::{IntoReply, Reply};
    ///
    /// let reply = Reply::new("frame").with_tos(46 << 2);
    /// assert_eq!(reply.tos(), Some(0xb8));
    /// ```
    #[must_use]
    pub fn with_tos(mut self, tos: u8) -> Self {
        self.tos = Some(tos);
        self
    }

    /// The payload.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::Reply;
    ///
    /// assert_eq!(Reply::new("pong").payload(), "pong");
    /// ```
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }
}

impl IntoReply for Reply {
    fn reply_len(&self) -> usize {
        self.payload.len()
    }

    fn into_reply(self) -> Option<Bytes> {
        Some(self.payload)
    }

    fn tos(&self) -> Option<u8> {
        self.tos
    }
}

impl IntoReply for Option<Reply> {
    fn reply_len(&self) -> usize {
        self.as_ref().map_or(0, Reply::reply_len)
    }

    fn into_reply(self) -> Option<Bytes> {
        self.map(|reply| reply.payload)
    }

    fn tos(&self) -> Option<u8> {
        self.as_ref().and_then(|reply| reply.tos)
    }
}

macro_rules! replies {
    ($($ty:ty => |$value:ident| $into:expr;)*) => {
        $(
            impl IntoReply for $ty {
                fn reply_len(&self) -> usize {
                    <[u8]>::len(self.as_ref())
                }

                fn into_reply(self) -> Option<Bytes> {
                    let $value = self;
                    Some($into)
                }
            }

            impl IntoReply for Option<$ty> {
                fn reply_len(&self) -> usize {
                    self.as_ref().map_or(0, IntoReply::reply_len)
                }

                fn into_reply(self) -> Option<Bytes> {
                    self.and_then(IntoReply::into_reply)
                }
            }
        )*
    };
}

replies! {
    Bytes => |bytes| bytes;
    BytesMut => |bytes| bytes.freeze();
    Vec<u8> => |bytes| Bytes::from(bytes);
    String => |text| Bytes::from(text);
    &'static [u8] => |bytes| Bytes::from_static(bytes);
    &'static str => |text| Bytes::from_static(text.as_bytes());
}

impl IntoReply for () {
    fn reply_len(&self) -> usize {
        0
    }

    fn into_reply(self) -> Option<Bytes> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(reply: impl IntoReply, expected: Option<&[u8]>) {
        assert_eq!(reply.reply_len(), expected.map_or(0, <[u8]>::len));
        assert_eq!(reply.into_reply().as_deref(), expected);
    }

    #[test]
    fn every_reply_type_measures_what_it_sends() {
        check(Bytes::from_static(b"ab"), Some(b"ab"));
        check(BytesMut::from(&b"abc"[..]), Some(b"abc"));
        check(b"abcd".to_vec(), Some(b"abcd"));
        check(String::from("x"), Some(b"x"));
        check(&b"yz"[..], Some(b"yz"));
        check("hello", Some(b"hello"));
        check(Some("hello"), Some(b"hello"));
        check(Some(String::from("hi")), Some(b"hi"));
        check(None::<Bytes>, None);
        check(None::<&'static str>, None);
        check((), None);
    }
}
