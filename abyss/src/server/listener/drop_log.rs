//! Says why datagrams are dropped at a level a default subscriber shows,
//! with what to change, without letting a flood write a line per datagram.

use std::fmt;
use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use super::super::stats::Outcome;
use crate::middleware::DropReason;
use crate::middleware::targets::CONNECTION;

/// How often each drop reason may be logged after its first time.
const EVERY: Duration = Duration::from_secs(10);

/// Lets a line through at most once per interval, counting the rest.
#[derive(Debug)]
pub(super) struct LogGate {
    interval: Duration,
    next: Option<Instant>,
    suppressed: u64,
}

impl Default for LogGate {
    fn default() -> Self {
        Self::every(Duration::from_secs(1))
    }
}

impl LogGate {
    pub(super) fn every(interval: Duration) -> Self {
        Self {
            interval,
            next: None,
            suppressed: 0,
        }
    }

    /// `Some(suppressed since the last one)` when this one may be logged.
    pub(super) fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.next {
            Some(next) if now < next => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.next = Some(now + self.interval);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// One gate per outcome: the first drop of each reason is logged at once,
/// then at most one line per reason every ten seconds, saying how many
/// went unlogged.
#[derive(Debug)]
pub(super) struct DropLog {
    gates: [LogGate; Outcome::COUNT],
}

impl Default for DropLog {
    fn default() -> Self {
        Self {
            gates: std::array::from_fn(|_| LogGate::every(EVERY)),
        }
    }
}

impl DropLog {
    /// Logs a drop of one datagram from `peer` for `outcome` (with the
    /// service's `error`, if that was the cause), if its gate allows.
    /// Outcomes that are not drops, or are logged where they happen
    /// (panics, send failures, aborts), are ignored.
    pub(super) fn note(
        &mut self,
        listener: usize,
        peer: SocketAddr,
        outcome: Outcome,
        error: Option<&dyn fmt::Display>,
    ) {
        let Some((warn, hint)) = hint(outcome) else {
            return;
        };
        let Some(suppressed) = self.gates[outcome.index()].allow() else {
            return;
        };
        let reason = outcome.as_str();
        // A user's error type formats itself here: a panic in its Display
        // must not end the listener.
        let _ = catch_unwind(AssertUnwindSafe(|| match (warn, error) {
            (true, Some(error)) => {
                tracing::warn!(target: CONNECTION, listener, %peer, reason, %error, suppressed, "datagram dropped: {hint}")
            }
            (true, None) => {
                tracing::warn!(target: CONNECTION, listener, %peer, reason, suppressed, "datagram dropped: {hint}")
            }
            (false, _) => {
                tracing::info!(target: CONNECTION, listener, %peer, reason, suppressed, "datagram dropped: {hint}")
            }
        }));
    }
}

/// Whether a drop for `outcome` is a warning (something to fix) rather than
/// a policy doing its job, and what to say about it.
fn hint(outcome: Outcome) -> Option<(bool, &'static str)> {
    Some(match outcome {
        Outcome::Truncated => (
            true,
            "longer than max_datagram_size, cut short by the kernel; raise Builder::max_datagram_size if such datagrams are expected",
        ),
        Outcome::HandlerError => (true, "the service failed"),
        Outcome::RefusedDestination => (
            false,
            "no reply to a source that cannot be answered (port 0, unspecified, broadcast or multicast)",
        ),
        Outcome::Layer(DropReason::TooLarge) => (
            true,
            "over the size limit; raise Builder::max_packet_size (default 8192) if such datagrams are expected",
        ),
        Outcome::Layer(DropReason::TimedOut) => (
            true,
            "handling outlived the timeout (Builder::timeout or a TimeoutLayer)",
        ),
        Outcome::Layer(DropReason::Overloaded) => (
            true,
            "too many requests in flight, shed (Builder::concurrency_shed or a load-shedding layer)",
        ),
        Outcome::Layer(DropReason::RateLimited) => (
            false,
            "over a rate limit: the peer's or its network's, or its network's replies of one kind (response rate limiting)",
        ),
        Outcome::Layer(DropReason::Amplification) => (
            false,
            "the reply was over the amplification limit for a peer not yet validated",
        ),
        Outcome::Layer(DropReason::OverBudget) => (
            false,
            "the reply was over the server's reply budget (Builder::reply_budget)",
        ),
        Outcome::Layer(_) => (false, "refused by a policy layer"),
        Outcome::Replied
        | Outcome::NoReply
        | Outcome::Panicked
        | Outcome::SendFailed
        | Outcome::Aborted => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_gate_lets_one_line_through_per_interval() {
        let mut gate = LogGate::default();
        assert_eq!(gate.allow(), Some(0));
        assert_eq!(gate.allow(), None);
        assert_eq!(gate.allow(), None);
        gate.next = Some(Instant::now() - Duration::from_millis(1));
        assert_eq!(gate.allow(), Some(2));
    }
}
