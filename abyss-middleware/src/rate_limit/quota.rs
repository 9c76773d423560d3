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
}

impl RateQuota {
    /// `max` datagrams per `window`, with a burst of `max`.
    pub fn new(max: u32, window: Duration) -> Self {
        Self {
            max,
            window,
            burst: max,
        }
    }

    /// `max` datagrams per second, with a burst of `max`.
    pub fn per_second(max: u32) -> Self {
        Self::new(max, Duration::from_secs(1))
    }

    /// Sets the burst: how many datagrams a peer that has been quiet may send
    /// at once.
    #[must_use]
    pub fn with_burst(mut self, burst: u32) -> Self {
        self.burst = burst;
        self
    }

    /// Datagrams per window.
    pub fn max(&self) -> u32 {
        self.max
    }

    /// The window.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// The burst.
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
