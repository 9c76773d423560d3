//! The errors the layers fail a request with when they drop its datagram:
//! one zero-sized type per [`DropReason`], so that dropping allocates
//! nothing (a box of a zero-sized value is no allocation), as tower's
//! [`Elapsed`](tower::timeout::error::Elapsed) and
//! [`Overloaded`](tower::load_shed::error::Overloaded). Find the reason
//! behind any of them with [`drop_reason`](crate::drop_reason); make one
//! with [`DropReason::into_error`].

use std::error::Error;
use std::fmt;

use crate::DropReason;

macro_rules! drop_errors {
    ($($(#[$doc:meta])* $name:ident => $reason:ident, $message:literal;)*) => {
        $(
            $(#[$doc])*
            #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
            pub struct $name;

            impl fmt::Display for $name {
                fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str($message)
                }
            }

            impl Error for $name {}
        )*

        /// The reason behind `error`, if it is one of the errors above.
        pub(crate) fn reason_of(error: &(dyn Error + 'static)) -> Option<DropReason> {
            $(
                if error.is::<$name>() {
                    return Some(DropReason::$reason);
                }
            )*
            None
        }
    };
}

drop_errors! {
    /// The payload was over the size limit.
    TooLarge => TooLarge, "datagram dropped: too_large";
    /// The peer was over its rate limit.
    RateLimited => RateLimited, "datagram dropped: rate_limited";
    /// The service was at its concurrency limit (the datagram was shed, not
    /// queued).
    Overloaded => Overloaded, "datagram dropped: overloaded";
    /// A policy refused the peer or the payload.
    Denied => Denied, "datagram dropped: denied";
    /// The reply was over the amplification limit for a peer not yet
    /// validated.
    AmplificationLimited => Amplification, "datagram dropped: amplification";
}
