//! The errors the layers fail a request with when they drop its datagram:
//! one zero-sized type per [`DropReason`], so that dropping allocates
//! nothing (a box of a zero-sized value is no allocation). For
//! `TimedOut` and `Overloaded` they are tower's own
//! [`Elapsed`](tower::timeout::error::Elapsed) and
//! [`Overloaded`](tower::load_shed::error::Overloaded). Find the reason
//! behind any of them with [`drop_reason`](crate::drop_reason); make one
//! with [`DropReason::into_error`].
//!
//! # Example
//!
//! ```
//! use abyss_middleware::error::TooLarge;
//! use abyss_middleware::{DropReason, drop_reason};
//!
//! let error: tower::BoxError = Box::new(TooLarge);
//! assert!(error.is::<TooLarge>());
//! assert_eq!(drop_reason(&*error), Some(DropReason::TooLarge));
//! ```

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
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::error::TooLarge;
    /// use abyss_middleware::DropReason;
    ///
    /// let error = DropReason::TooLarge.into_error();
    /// assert!(error.is::<TooLarge>());
    /// assert_eq!(error.to_string(), "datagram dropped: too_large");
    /// ```
    TooLarge => TooLarge, "datagram dropped: too_large";
    /// The peer was over its rate limit.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::error::RateLimited;
    /// use abyss_middleware::DropReason;
    ///
    /// let error = DropReason::RateLimited.into_error();
    /// assert!(error.is::<RateLimited>());
    /// assert_eq!(error.to_string(), "datagram dropped: rate_limited");
    /// ```
    RateLimited => RateLimited, "datagram dropped: rate_limited";
    /// A policy refused the peer or the payload.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::error::Denied;
    /// use abyss_middleware::DropReason;
    ///
    /// let error = DropReason::Denied.into_error();
    /// assert!(error.is::<Denied>());
    /// assert_eq!(error.to_string(), "datagram dropped: denied");
    /// ```
    Denied => Denied, "datagram dropped: denied";
    /// The reply was over the amplification limit for a peer not yet
    /// validated.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::error::AmplificationLimited;
    /// use abyss_middleware::DropReason;
    ///
    /// let error = DropReason::Amplification.into_error();
    /// assert!(error.is::<AmplificationLimited>());
    /// assert_eq!(error.to_string(), "datagram dropped: amplification");
    /// ```
    AmplificationLimited => Amplification, "datagram dropped: amplification";
    /// The reply was over the server's reply budget.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::error::OverBudget;
    /// use abyss_middleware::DropReason;
    ///
    /// let error = DropReason::OverBudget.into_error();
    /// assert!(error.is::<OverBudget>());
    /// assert_eq!(error.to_string(), "datagram dropped: over_budget");
    /// ```
    OverBudget => OverBudget, "datagram dropped: over_budget";
}
