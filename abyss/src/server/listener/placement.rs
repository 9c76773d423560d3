//! Where service futures run: on the listener's task (inline), or spread
//! over the runtime's worker threads, chosen from how long handlers hold
//! the listener and how many listeners are busy.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::Dispatch;

/// Datagrams measured before the choice is reconsidered.
const WINDOW: u32 = 64;
/// Handling that takes longer than this per datagram, on average, may move
/// to the workers: a spawned task costs about a microsecond or two (the
/// task, a wake-up across threads), which heavier handlers repay by running
/// on every core while the listener keeps reading.
const SPAWN_ABOVE: Duration = Duration::from_micros(10);
/// ... and comes back inline below this (a gap, so that handlers near the
/// line do not flip at every window).
const INLINE_BELOW: Duration = Duration::from_micros(3);
/// A listener whose handlers kept a core at least this busy (as a share of
/// the time its window took) counts as busy.
const BUSY_SHARE: f64 = 0.5;
/// How long a listener counts as busy after it last was.
const BUSY_FOR: Duration = Duration::from_millis(200);

/// When each listener of a server was last busy, for listeners to tell
/// whether a worker is left idle: spreading one listener's handlers over
/// the workers pays only while fewer listeners are busy than there are
/// workers (with several busy peers, the kernel already spreads them over
/// the listeners, each on its own core, and spawning would only add cost).
#[derive(Debug)]
pub(crate) struct Busy {
    origin: Instant,
    /// Per listener: when it was last busy, in milliseconds since `origin`
    /// plus one (0: never).
    last: Box<[AtomicU64]>,
}

impl Busy {
    pub(crate) fn new(listeners: usize) -> Self {
        Self {
            origin: Instant::now(),
            last: (0..listeners).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn now(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64 + 1
    }

    fn mark(&self, index: usize, busy: bool) {
        if let Some(slot) = self.last.get(index) {
            slot.store(if busy { self.now() } else { 0 }, Ordering::Relaxed);
        }
    }

    /// Listeners busy within the last `BUSY_FOR`.
    fn count(&self) -> usize {
        let now = self.now();
        let recent = BUSY_FOR.as_millis() as u64;
        self.last
            .iter()
            .map(|slot| slot.load(Ordering::Relaxed))
            .filter(|&at| at != 0 && now.saturating_sub(at) <= recent)
            .count()
    }
}

#[derive(Debug)]
pub(super) struct Placement {
    dispatch: Dispatch,
    /// Worker threads of the runtime.
    workers: usize,
    busy: Arc<Busy>,
    index: usize,
    spawning: bool,
    measured: Duration,
    count: u32,
    since: Instant,
}

impl Placement {
    pub(super) fn new(dispatch: Dispatch, busy: Arc<Busy>, index: usize) -> Self {
        let workers = tokio::runtime::Handle::try_current()
            .map_or(1, |runtime| runtime.metrics().num_workers());
        Self {
            dispatch,
            workers,
            busy,
            index,
            spawning: matches!(dispatch, Dispatch::Spawn),
            measured: Duration::ZERO,
            count: 0,
            since: Instant::now(),
        }
    }

    /// Whether the next service future runs on a worker.
    pub(super) fn spawning(&self) -> bool {
        self.spawning
    }

    /// Whether handling time is being measured (only `Auto` chooses).
    pub(super) fn measuring(&self) -> bool {
        matches!(self.dispatch, Dispatch::Auto) && self.workers > 1
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
        let wall = self.since.elapsed().max(Duration::from_micros(1));
        let busy = self.measured.as_secs_f64() / wall.as_secs_f64() >= BUSY_SHARE;
        self.busy.mark(self.index, busy);
        self.measured = Duration::ZERO;
        self.count = 0;
        self.since = Instant::now();
        // Is a worker left for this listener's handlers to spread to?
        let room = self.busy.count() < self.workers;
        let spawning = if self.spawning {
            average >= INLINE_BELOW && room
        } else {
            average > SPAWN_ABOVE && room
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

    fn auto(busy: Arc<Busy>, index: usize) -> Placement {
        Placement {
            dispatch: Dispatch::Auto,
            workers: 2,
            busy,
            index,
            spawning: false,
            measured: Duration::ZERO,
            count: 0,
            since: Instant::now(),
        }
    }

    /// Records a window of 64 datagrams of `micros` each, as if it took
    /// exactly that much wall time (the listener busy all along).
    fn window(placement: &mut Placement, micros: u64) -> Option<bool> {
        placement.since = Instant::now() - Duration::from_micros(micros * 64);
        placement.record(Duration::from_micros(micros * 64), 64)
    }

    #[test]
    fn one_busy_listener_spreads_its_heavy_handlers_and_light_ones_come_back() {
        let busy = Arc::new(Busy::new(2));
        let mut placement = auto(busy, 0);
        assert_eq!(
            window(&mut placement, 1),
            None,
            "cheap handlers stay inline"
        );
        assert_eq!(window(&mut placement, 50), Some(true), "50 us each: spread");
        assert_eq!(window(&mut placement, 5), None, "between the lines");
        assert_eq!(window(&mut placement, 1), Some(false), "1 us each: back");
    }

    #[test]
    fn when_every_worker_has_a_busy_listener_handlers_stay_inline() {
        let busy = Arc::new(Busy::new(2));
        let mut first = auto(busy.clone(), 0);
        let mut second = auto(busy, 1);
        // Both listeners have heavy peers: each keeps its own core.
        assert_eq!(window(&mut first, 50), Some(true));
        assert_eq!(window(&mut second, 50), None, "no idle worker for it");
        // The first sees the second busy now, and comes back inline.
        assert_eq!(window(&mut first, 50), Some(false));
    }

    #[test]
    fn forced_modes_and_single_worker_runtimes_never_change() {
        let busy = Arc::new(Busy::new(1));
        let mut inline = Placement {
            dispatch: Dispatch::Inline,
            ..auto(busy.clone(), 0)
        };
        assert_eq!(window(&mut inline, 1_000), None);
        assert!(!inline.spawning());
        let mut one_worker = Placement {
            workers: 1,
            ..auto(busy, 0)
        };
        assert_eq!(window(&mut one_worker, 1_000), None);
        assert!(!one_worker.spawning());
    }
}
