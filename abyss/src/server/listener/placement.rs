//! Where service futures run: on the listener's task (inline), or spread
//! over the runtime's worker threads, chosen from how long handlers hold
//! the listener.

use std::time::Duration;

use crate::Dispatch;

/// Datagrams measured before the choice is reconsidered.
const WINDOW: u32 = 64;
/// Handling that takes longer than this per datagram, on average, moves to
/// the workers: a spawned task costs about a microsecond or two (the task,
/// a wake-up across threads), which heavier handlers repay by running on
/// every core while the listener keeps reading.
const SPAWN_ABOVE: Duration = Duration::from_micros(10);
/// ... and back inline below this (a gap, so that handlers near the line
/// do not flip at every window).
const INLINE_BELOW: Duration = Duration::from_micros(3);

#[derive(Debug)]
pub(super) struct Placement {
    dispatch: Dispatch,
    /// Whether the runtime has more than one worker to spread work over.
    workers: bool,
    spawning: bool,
    measured: Duration,
    count: u32,
}

impl Placement {
    pub(super) fn new(dispatch: Dispatch) -> Self {
        let workers = tokio::runtime::Handle::try_current()
            .is_ok_and(|runtime| runtime.metrics().num_workers() > 1);
        Self {
            dispatch,
            workers,
            spawning: matches!(dispatch, Dispatch::Spawn),
            measured: Duration::ZERO,
            count: 0,
        }
    }

    /// Whether the next service future runs on a worker.
    pub(super) fn spawning(&self) -> bool {
        self.spawning
    }

    /// Whether handling time is being measured (only `Auto` chooses).
    pub(super) fn measuring(&self) -> bool {
        matches!(self.dispatch, Dispatch::Auto) && self.workers
    }

    /// Records `took` of handling for `datagrams` datagrams; returns the new
    /// choice when it changed.
    pub(super) fn record(&mut self, took: Duration, datagrams: u32) -> Option<bool> {
        if !self.measuring() {
            return None;
        }
        self.measured += took;
        self.count += datagrams;
        if self.count < WINDOW {
            return None;
        }
        let average = self.measured / self.count;
        self.measured = Duration::ZERO;
        self.count = 0;
        let spawning = if self.spawning {
            average >= INLINE_BELOW
        } else {
            average > SPAWN_ABOVE
        };
        (spawning != self.spawning).then(|| {
            self.spawning = spawning;
            spawning
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auto() -> Placement {
        Placement {
            dispatch: Dispatch::Auto,
            workers: true,
            spawning: false,
            measured: Duration::ZERO,
            count: 0,
        }
    }

    #[test]
    fn heavy_handlers_move_to_the_workers_and_light_ones_come_back() {
        let mut placement = auto();
        // Cheap handlers stay inline.
        assert_eq!(placement.record(Duration::from_micros(64), 64), None);
        assert!(!placement.spawning());
        // 50 us each: off the listener.
        assert_eq!(
            placement.record(Duration::from_micros(50 * 64), 64),
            Some(true)
        );
        assert!(placement.spawning());
        // 5 us each: between the lines, no change.
        assert_eq!(placement.record(Duration::from_micros(5 * 64), 64), None);
        // 1 us each: back inline.
        assert_eq!(placement.record(Duration::from_micros(64), 64), Some(false));
    }

    #[test]
    fn forced_modes_and_single_worker_runtimes_never_change() {
        let mut inline = Placement {
            dispatch: Dispatch::Inline,
            ..auto()
        };
        assert_eq!(inline.record(Duration::from_secs(1), 64), None);
        assert!(!inline.spawning());
        let mut one_worker = Placement {
            workers: false,
            ..auto()
        };
        assert_eq!(one_worker.record(Duration::from_secs(1), 64), None);
        assert!(!one_worker.spawning());
    }
}
