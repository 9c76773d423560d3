use std::error::Error;
use std::fmt;

/// Why a datagram was dropped on purpose by a layer.
///
/// # Example
///
/// ```
/// use abyss_middleware::{DropReason, drop_reason};
///
/// let error = DropReason::TooLarge.into_error();
/// assert_eq!(drop_reason(&*error), Some(DropReason::TooLarge));
/// assert_eq!(DropReason::TooLarge.to_string(), "too_large");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DropReason {
    /// The payload was over the size limit.
    TooLarge,
    /// The peer was over its rate limit.
    RateLimited,
    /// Handling took longer than the timeout.
    TimedOut,
    /// The service was at its concurrency limit.
    Overloaded,
    /// A policy (allow/deny list, validation) refused the peer or payload.
    Denied,
    /// The reply was more than the amplification limit allows for a peer
    /// not yet validated.
    Amplification,
    /// The reply was over the server's budget of replies or reply bytes
    /// per second ([`ReplyBudget`](crate::ReplyBudget)).
    OverBudget,
}

impl DropReason {
    /// A short `snake_case` name, as used in logs and metrics.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::DropReason;
    ///
    /// assert_eq!(DropReason::RateLimited.as_str(), "rate_limited");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::TooLarge => "too_large",
            DropReason::RateLimited => "rate_limited",
            DropReason::TimedOut => "timed_out",
            DropReason::Overloaded => "overloaded",
            DropReason::Denied => "denied",
            DropReason::Amplification => "amplification",
            DropReason::OverBudget => "over_budget",
        }
    }
}

impl DropReason {
    /// This reason as an error, without allocating: each reason has a
    /// zero-sized error type of its own (see [`error`](crate::error)), and
    /// a box of a zero-sized value allocates nothing. [`drop_reason`]
    /// recognises them. Layers fail requests with it.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::DropReason;
    ///
    /// /// A handler that refuses peers on privileged ports, counted as `denied`.
    /// async fn handle(peer: std::net::SocketAddr) -> Result<Option<bytes::Bytes>, tower::BoxError> {
    ///     if peer.port() < 1024 {
    ///         return Err(DropReason::Denied.into_error());
    ///     }
    ///     Ok(None)
    /// }
    /// # let _ = handle;
    /// ```
    pub fn into_error(self) -> tower::BoxError {
        use crate::error;
        match self {
            DropReason::TooLarge => Box::new(error::TooLarge),
            DropReason::RateLimited => Box::new(error::RateLimited),
            DropReason::TimedOut => Box::new(tower::timeout::error::Elapsed::new()),
            DropReason::Overloaded => Box::new(tower::load_shed::error::Overloaded::new()),
            DropReason::Denied => Box::new(error::Denied),
            DropReason::Amplification => Box::new(error::AmplificationLimited),
            DropReason::OverBudget => Box::new(error::OverBudget),
        }
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error that drops the datagram on purpose, for a reason chosen at run
/// time. It is one byte, so boxing it allocates; the layers use
/// [`DropReason::into_error`] instead, which does not.
///
/// # Example
///
/// ```
/// use abyss_middleware::{DropReason, Dropped, drop_reason};
///
/// fn refuse(busy: bool) -> tower::BoxError {
///     let reason = if busy { DropReason::Overloaded } else { DropReason::Denied };
///     Dropped::new(reason).into()
/// }
///
/// let error = refuse(false);
/// assert_eq!(drop_reason(&*error), Some(DropReason::Denied));
/// assert_eq!(error.to_string(), "datagram dropped: denied");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    reason: DropReason,
}

impl Dropped {
    /// A datagram dropped for `reason`.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::{DropReason, Dropped};
    ///
    /// assert_eq!(Dropped::new(DropReason::Overloaded).reason(), DropReason::Overloaded);
    /// ```
    pub fn new(reason: DropReason) -> Self {
        Self { reason }
    }

    /// Why it was dropped.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::{DropReason, Dropped};
    ///
    /// let dropped = Dropped::new(DropReason::TimedOut);
    /// assert_eq!(dropped.reason(), DropReason::TimedOut);
    /// ```
    pub fn reason(&self) -> DropReason {
        self.reason
    }
}

impl fmt::Display for Dropped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "datagram dropped: {}", self.reason)
    }
}

impl Error for Dropped {}

/// The drop reason behind `error`, if it (or an error in its source chain)
/// is a [`Dropped`], tower's timeout [`Elapsed`](tower::timeout::error::Elapsed)
/// or tower's load-shed [`Overloaded`](tower::load_shed::error::Overloaded).
///
/// # Example
///
/// ```
/// use abyss_middleware::{DropReason, drop_reason};
///
/// let timed_out: tower::BoxError = Box::new(tower::timeout::error::Elapsed::new());
/// assert_eq!(drop_reason(&*timed_out), Some(DropReason::TimedOut));
///
/// let handler_error = std::io::Error::other("database unreachable");
/// assert_eq!(drop_reason(&handler_error), None, "a failure, not a drop");
/// ```
pub fn drop_reason(error: &(dyn Error + 'static)) -> Option<DropReason> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(dropped) = e.downcast_ref::<Dropped>() {
            return Some(dropped.reason());
        }
        if let Some(reason) = crate::error::reason_of(e) {
            return Some(reason);
        }
        if e.is::<tower::timeout::error::Elapsed>() {
            return Some(DropReason::TimedOut);
        }
        if e.is::<tower::load_shed::error::Overloaded>() {
            return Some(DropReason::Overloaded);
        }
        current = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Wrapper(Box<dyn Error + Send + Sync>);
    impl fmt::Display for Wrapper {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("wrapped")
        }
    }
    impl Error for Wrapper {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&*self.0)
        }
    }

    #[test]
    fn a_dropped_error_is_found_through_its_source_chain() {
        let inner: Box<dyn Error + Send + Sync> = Box::new(Dropped::new(DropReason::RateLimited));
        let outer = Wrapper(inner);
        assert_eq!(drop_reason(&outer), Some(DropReason::RateLimited));
    }

    #[test]
    fn towers_timeout_and_load_shed_errors_map_to_their_reasons() {
        let elapsed = tower::timeout::error::Elapsed::new();
        assert_eq!(drop_reason(&elapsed), Some(DropReason::TimedOut));
        let overloaded = tower::load_shed::error::Overloaded::new();
        assert_eq!(drop_reason(&overloaded), Some(DropReason::Overloaded));
    }

    #[test]
    fn every_reason_survives_the_round_trip_through_its_zero_sized_error() {
        for reason in [
            DropReason::TooLarge,
            DropReason::RateLimited,
            DropReason::TimedOut,
            DropReason::Overloaded,
            DropReason::Denied,
            DropReason::Amplification,
            DropReason::OverBudget,
        ] {
            let error = reason.into_error();
            assert_eq!(drop_reason(&*error), Some(reason));
            assert_eq!(std::mem::size_of_val(&*error), 0, "{reason} allocates");
        }
    }

    #[test]
    fn an_unrelated_error_has_no_drop_reason() {
        let error = std::io::Error::other("boom");
        assert_eq!(drop_reason(&error), None);
    }
}
