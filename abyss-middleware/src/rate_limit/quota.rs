use std::num::NonZeroU32;
use std::time::Duration;

/// N datagrams per window, with a burst; see the [module docs](super).
///
/// Built freely and checked when given to a limiter, which fails with a
/// [`RateLimitError`] naming the bad value.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use abyss_middleware::RateQuota;
///
/// // The original's rate_limit_max_packets: 1000, rate_limit_window_ms: 1000.
/// let quota = RateQuota::new(1000, Duration::from_millis(1000));
/// assert_eq!(quota, RateQuota::per_second(1000));
/// assert_eq!(quota.burst(), 1000);
/// assert_eq!(RateQuota::per_second(10).with_burst(20).burst(), 20);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateQuota {
    max: u32,
    window: Duration,
    burst: u32,
}

/// Why a rate limiter cannot be built: a bad [`RateQuota`] or option.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use abyss_middleware::{PeerRateLimiter, RateQuota};
///
/// let error = PeerRateLimiter::new(RateQuota::new(10, Duration::ZERO)).unwrap_err();
/// assert_eq!(error.field, "window");
/// assert_eq!(error.to_string(), "invalid rate limit `window`: must be at least 1 ns per datagram");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RateLimitError {
    /// The value at fault: the quota's `max`, `window` or `burst`, or
    /// `max_tracked_peers`, `prefix_v4`, `prefix_v6`.
    pub field: &'static str,
    /// What is wrong.
    pub reason: String,
}

impl std::fmt::Display for RateLimitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid rate limit `{}`: {}", self.field, self.reason)
    }
}

impl std::error::Error for RateLimitError {}

impl RateLimitError {
    pub(crate) fn new(field: &'static str, reason: &str) -> Self {
        Self {
            field,
            reason: reason.to_owned(),
        }
    }

    /// What is wrong, naming the part at fault as a part of `option`: the
    /// reason to give when the quota was set by an option of that name
    /// (`abyss`'s `Builder::rate_limit` gives
    /// `rate_limit.burst: must be at least 1`).
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::{PeerRateLimiter, RateQuota};
    ///
    /// let error = PeerRateLimiter::new(RateQuota::per_second(10).with_burst(0)).unwrap_err();
    /// assert_eq!(error.qualified_reason("rate_limit"), "rate_limit.burst: must be at least 1");
    /// ```
    pub fn qualified_reason(&self, option: &str) -> String {
        format!("{option}.{}: {}", self.field, self.reason)
    }
}

impl RateQuota {
    /// `max` datagrams per `window`, with a burst of `max`.
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use abyss_middleware::RateQuota;
    ///
    /// // 30 datagrams a minute: one every 2 s, or 30 at once after a quiet minute.
    /// let quota = RateQuota::new(30, Duration::from_secs(60));
    /// assert_eq!((quota.max(), quota.window(), quota.burst()), (30, Duration::from_secs(60), 30));
    /// ```
    pub fn new(max: u32, window: Duration) -> Self {
        Self {
            max,
            window,
            burst: max,
        }
    }

    /// `max` datagrams per second, with a burst of `max`.
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use abyss_middleware::RateQuota;
    ///
    /// assert_eq!(RateQuota::per_second(10), RateQuota::new(10, Duration::from_secs(1)));
    /// ```
    pub fn per_second(max: u32) -> Self {
        Self::new(max, Duration::from_secs(1))
    }

    /// Sets the burst: how many datagrams a peer that has been quiet may send
    /// at once.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::RateQuota;
    ///
    /// // 10 per second on average, but never more than 2 at once.
    /// let smooth = RateQuota::per_second(10).with_burst(2);
    /// assert_eq!(smooth.burst(), 2);
    /// ```
    #[must_use]
    pub fn with_burst(mut self, burst: u32) -> Self {
        self.burst = burst;
        self
    }

    /// Datagrams per window.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::RateQuota;
    ///
    /// assert_eq!(RateQuota::per_second(10).max(), 10);
    /// ```
    pub fn max(&self) -> u32 {
        self.max
    }

    /// The window.
    ///
    /// # Example
    ///
    /// ```
    /// use std::time::Duration;
    /// use abyss_middleware::RateQuota;
    ///
    /// assert_eq!(RateQuota::per_second(10).window(), Duration::from_secs(1));
    /// ```
    pub fn window(&self) -> Duration {
        self.window
    }

    /// The burst.
    ///
    /// # Example
    ///
    /// ```
    /// use abyss_middleware::RateQuota;
    ///
    /// assert_eq!(RateQuota::per_second(10).burst(), 10, "the burst is max unless set");
    /// ```
    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// Checks the quota and turns it into governor's.
    pub(crate) fn to_governor(self) -> Result<governor::Quota, RateLimitError> {
        let error = RateLimitError::new;
        if self.max == 0 {
            return Err(error("max", "must be at least 1"));
        }
        let burst =
            NonZeroU32::new(self.burst()).ok_or_else(|| error("burst", "must be at least 1"))?;
        let interval = self.window / self.max;
        if interval.is_zero() {
            return Err(error("window", "must be at least 1 ns per datagram"));
        }
        let quota = governor::Quota::with_period(interval)
            .ok_or_else(|| error("window", "must not be zero"))?;
        Ok(quota.allow_burst(burst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_invalid_part_of_a_quota_is_named() {
        assert_eq!(
            RateQuota::per_second(0).to_governor().unwrap_err().field,
            "max"
        );
        assert_eq!(
            RateQuota::per_second(10)
                .with_burst(0)
                .to_governor()
                .unwrap_err()
                .field,
            "burst"
        );
        assert_eq!(
            RateQuota::new(10, Duration::ZERO)
                .to_governor()
                .unwrap_err()
                .field,
            "window"
        );
    }

    #[test]
    fn a_quota_spaces_its_allowance_evenly_over_the_window() {
        let quota = RateQuota::new(10, Duration::from_millis(500))
            .with_burst(3)
            .to_governor()
            .unwrap();
        assert_eq!(quota.replenish_interval(), Duration::from_millis(50));
        assert_eq!(quota.burst_size().get(), 3);
    }
}
