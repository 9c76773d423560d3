//! The bounded, sharded state store behind [`PeerRateLimiter`](super::PeerRateLimiter).

use std::cell::Cell;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::Clock;
use governor::nanos::Nanos;
use governor::state::StateStore;
use hashbrown::{DefaultHashBuilder, HashMap};

thread_local! {
    /// When the datagram being checked on this thread arrived, if known: the
    /// limiter measures the peer's sending rate at arrival times, which also
    /// saves a clock read per datagram.
    static ARRIVAL: Cell<Option<tokio::time::Instant>> = const { Cell::new(None) };
}

/// Runs `check` with the clock reading `arrival`.
pub(super) fn at_arrival<T>(arrival: tokio::time::Instant, check: impl FnOnce() -> T) -> T {
    ARRIVAL.with(|cell| cell.set(Some(arrival)));
    let result = check();
    ARRIVAL.with(|cell| cell.set(None));
    result
}

/// Tokio's clock (so paused test time applies), as a `Duration` since a base
/// instant shared by every limiter built on one table.
#[derive(Debug, Clone)]
pub(crate) struct TableClock {
    base: tokio::time::Instant,
    started: Arc<AtomicBool>,
}

impl TableClock {
    pub(crate) fn new(base: tokio::time::Instant) -> Self {
        Self {
            base,
            started: Default::default(),
        }
    }

    pub(crate) fn elapsed(&self) -> Duration {
        tokio::time::Instant::now().saturating_duration_since(self.base)
    }
}

impl Clock for TableClock {
    type Instant = Duration;

    /// The first reading, which `RateLimiter::new` takes as its start, is the
    /// base itself. Every limiter on one table then measures from the same
    /// zero, which is what lets the table evict idle keys by comparing their
    /// arrival times with the clock. Later readings are the arrival time of
    /// the datagram being checked, or the clock when there is none.
    fn now(&self) -> Duration {
        // A plain load first: the swap happens once per limiter, not per
        // datagram.
        if !self.started.load(Ordering::Relaxed) && !self.started.swap(true, Ordering::Relaxed) {
            return Duration::ZERO;
        }
        match ARRIVAL.with(Cell::get) {
            Some(arrival) => arrival.saturating_duration_since(self.base),
            None => self.elapsed(),
        }
    }
}

/// Slots a new key inspects, from the clock hand on, for an idle key to
/// replace when its shard is full: bounded work per new key, and no scan
/// of the shard under its lock.
const PROBES: usize = 8;

/// One shard: peers, the overflow allowance, and counters.
///
/// Keys live in `slots`, in no order, with their theoretical arrival times;
/// `index` finds a key's slot. When the shard is full, a new key takes the
/// slot of an idle key (one whose allowance has fully refilled, so that
/// forgetting it loses nothing) found among the next [`PROBES`] slots
/// from a hand that sweeps round the slots (CLOCK); with none there, it
/// shares the overflow allowance.
#[derive(Debug)]
struct Shard<K> {
    /// Key -> its place in `slots`.
    index: HashMap<K, usize>,
    /// Key and theoretical arrival time (ns since the base).
    slots: Vec<(K, u64)>,
    /// Where the next search for an idle key starts.
    hand: usize,
    capacity: usize,
    /// The allowance new peers share while the shard is full of active ones.
    overflow: Option<u64>,
    allowed: u64,
    limited: u64,
    evicted: u64,
}

impl<K: Hash + Eq + Clone> Shard<K> {
    /// An idle key's slot among the next [`PROBES`] from the hand.
    fn idle_slot(&mut self, now: u64) -> Option<usize> {
        let len = self.slots.len();
        for _ in 0..PROBES.min(len) {
            let at = self.hand % len;
            self.hand = at + 1;
            if self.slots[at].1 <= now {
                return Some(at);
            }
        }
        None
    }

    /// Puts `key` in slot `at`, forgetting the key there.
    fn replace(&mut self, at: usize, key: &K, tat: u64) {
        let (old, _) = std::mem::replace(&mut self.slots[at], (key.clone(), tat));
        self.index.remove(&old);
        self.index.insert(key.clone(), at);
        self.evicted += 1;
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Totals {
    pub(crate) tracked: usize,
    pub(super) allowed: u64,
    pub(super) limited: u64,
    pub(super) evicted: u64,
}

/// Keyed GCRA state with at most `capacity` keys.
#[derive(Debug)]
pub(crate) struct Table<K> {
    shards: Box<[Padded<Mutex<Shard<K>>>]>,
    picker: DefaultHashBuilder,
    clock: TableClock,
}

/// Keeps each shard's lock on its own cache lines.
#[derive(Debug)]
#[repr(align(128))]
struct Padded<T>(T);

impl<K: Hash + Eq + Clone> Table<K> {
    pub(crate) fn new(capacity: usize, clock: TableClock) -> Self {
        let count = (capacity / 256).clamp(1, 64);
        let shards = (0..count)
            .map(|i| {
                // Split the capacity exactly: the total never exceeds it.
                let share = capacity / count + usize::from(i < capacity % count);
                Padded(Mutex::new(Shard {
                    index: HashMap::with_capacity(share.min(1024)),
                    slots: Vec::with_capacity(share.min(1024)),
                    hand: 0,
                    capacity: share,
                    overflow: None,
                    allowed: 0,
                    limited: 0,
                    evicted: 0,
                }))
            })
            .collect();
        Self {
            shards,
            picker: DefaultHashBuilder::default(),
            clock,
        }
    }

    fn shard(&self, key: &K) -> &Mutex<Shard<K>> {
        let index = (self.picker.hash_one(key) % self.shards.len() as u64) as usize;
        &self.shards[index].0
    }

    pub(crate) fn totals(&self) -> Totals {
        let mut totals = Totals::default();
        for shard in self.shards.iter() {
            let shard = shard.0.lock().unwrap_or_else(|e| e.into_inner());
            totals.tracked += shard.slots.len();
            totals.allowed += shard.allowed;
            totals.limited += shard.limited;
            totals.evicted += shard.evicted;
        }
        totals
    }

    /// Forgets every key (counters are kept).
    pub(super) fn forget_all(&self) {
        for shard in self.shards.iter() {
            let mut shard = shard.0.lock().unwrap_or_else(|e| e.into_inner());
            shard.index.clear();
            shard.slots.clear();
            shard.overflow = None;
        }
    }

    /// Drops every key whose allowance has fully refilled.
    pub(super) fn evict_idle(&self) {
        let now = Nanos::from(self.clock.elapsed()).as_u64();
        for shard in self.shards.iter() {
            let mut shard = shard.0.lock().unwrap_or_else(|e| e.into_inner());
            evict_idle(&mut shard, now);
        }
    }
}

fn evict_idle<K: Hash + Eq + Clone>(shard: &mut Shard<K>, now: u64) {
    let before = shard.slots.len();
    shard.slots.retain(|(_, tat)| *tat > now);
    if shard.slots.len() != before {
        shard.evicted += (before - shard.slots.len()) as u64;
        shard.index.clear();
        for (at, (key, _)) in shard.slots.iter().enumerate() {
            shard.index.insert(key.clone(), at);
        }
    }
    if shard.overflow.is_some_and(|tat| tat <= now) {
        shard.overflow = None;
    }
}

/// A shared handle on a table: what governor's limiters hold as their store.
#[derive(Debug)]
pub(crate) struct SharedTable<K>(pub(crate) Arc<Table<K>>);

impl<K: Hash + Eq + Clone> StateStore for SharedTable<K> {
    type Key = K;

    fn measure_and_replace<T, F, E>(&self, key: &K, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let mut guard = self.0.shard(key).lock().unwrap_or_else(|e| e.into_inner());
        let shard = &mut *guard;
        let result = if let Some(&at) = shard.index.get(key) {
            let tat = &mut shard.slots[at].1;
            f(Some(Nanos::new(*tat))).map(|(t, next)| {
                *tat = next.as_u64();
                t
            })
        } else if shard.slots.len() < shard.capacity {
            f(None).map(|(t, next)| {
                shard.index.insert(key.clone(), shard.slots.len());
                shard.slots.push((key.clone(), next.as_u64()));
                t
            })
        } else {
            let now = Nanos::from(self.0.clock.elapsed()).as_u64();
            match shard.idle_slot(now) {
                Some(at) => f(None).map(|(t, next)| {
                    shard.replace(at, key, next.as_u64());
                    t
                }),
                None => f(shard.overflow.map(Nanos::new)).map(|(t, next)| {
                    shard.overflow = Some(next.as_u64());
                    t
                }),
            }
        };
        match result {
            Ok(_) => shard.allowed += 1,
            Err(_) => shard.limited += 1,
        }
        result
    }
}
