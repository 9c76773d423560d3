//! The server's and the sessions' metrics, fed to the `metrics` facade
//! (feature `metrics`). What is exported, and why it is fed this way, is
//! documented for users on [`Stats`](crate::Stats#metrics).
//!
//! Nothing here runs per datagram except [`Listener::record`]. The counts
//! stay where they always are (each listener's own cache-line-padded
//! atomics, which `ServerHandle::stats` reads, and a sessions table's
//! counters); a task per server and per sessions table *publishes* them:
//! every [`PUBLISH_INTERVAL`], and at once when one of the server's sockets
//! opens or closes, it resolves each handle from the recorder installed at
//! that moment and sets it with `Counter::absolute` and `Gauge::set`. So a
//! recorder installed after `serve()` gets the whole counts at its first
//! round, and the hot path writes no atomic shared between listeners.
//!
//! Series are per label, process-wide: a [`Series`] adds up the live
//! sources under its label and keeps what the gone ones counted. Without
//! that, a server started again under the same name would publish its own
//! small totals, which `absolute` (a maximum, for counters) ignores: its
//! series would stand still until the new server overtook the old one.

#![cfg(feature = "metrics")]

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::time::Duration;

use ::metrics::{Histogram, Key, KeyName, Label, Level, Metadata, Recorder, SharedString, Unit};
use tokio::sync::Notify;

use super::stats::{Counters, Outcome, Stats};
use crate::middleware::targets::LISTENER;
use crate::session::SessionStats;

/// How often the counts are copied into the facade (besides when a
/// server's socket opens or closes).
pub(crate) const PUBLISH_INTERVAL: Duration = Duration::from_secs(1);

static METADATA: Metadata<'static> = Metadata::new("abyss", Level::INFO, Some(module_path!()));

/// The label that tells servers apart.
const SERVER_LABEL: &str = "server";
/// The label that tells sessions tables apart.
const SESSIONS_LABEL: &str = "sessions";

const DATAGRAMS_RECEIVED: &str = "abyss_datagrams_received_total";
const RECEIVED_BYTES: &str = "abyss_received_bytes_total";
const SENT_BYTES: &str = "abyss_sent_bytes_total";
const DATAGRAMS: &str = "abyss_datagrams_total";
const IN_FLIGHT: &str = "abyss_in_flight";
const RECEIVE_ERRORS: &str = "abyss_receive_errors_total";
const READS_PAUSED: &str = "abyss_reads_paused_total";
const KERNEL_DROPS: &str = "abyss_kernel_drops_total";
const UNREAD_AT_CLOSE: &str = "abyss_unread_at_close_total";
const GROUP_COPIES_SKIPPED: &str = "abyss_group_copies_skipped_total";
const HANDLING: &str = "abyss_handling_seconds";

const SESSIONS_LIVE: &str = "abyss_sessions_live";
const SESSIONS_CREATED: &str = "abyss_sessions_created_total";
const SESSIONS_ENDED: &str = "abyss_sessions_ended_total";
const SESSIONS_IDLE_TIMEOUTS: &str = "abyss_sessions_idle_timeouts_total";
const SESSIONS_DROPPED: &str = "abyss_sessions_dropped_datagrams_total";

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// A metric's name, type, unit and help text.
struct Family {
    name: &'static str,
    kind: Kind,
    unit: Unit,
    help: &'static str,
}

const fn family(name: &'static str, kind: Kind, unit: Unit, help: &'static str) -> Family {
    Family {
        name,
        kind,
        unit,
        help,
    }
}

const SERVER_FAMILIES: [Family; 11] = [
    family(
        DATAGRAMS_RECEIVED,
        Kind::Counter,
        Unit::Count,
        "Datagrams taken from the server's sockets.",
    ),
    family(
        RECEIVED_BYTES,
        Kind::Counter,
        Unit::Bytes,
        "Payload bytes of the datagrams taken from the server's sockets.",
    ),
    family(
        SENT_BYTES,
        Kind::Counter,
        Unit::Bytes,
        "Payload bytes of the replies the kernel took.",
    ),
    family(
        DATAGRAMS,
        Kind::Counter,
        Unit::Count,
        "Datagrams finished, by outcome: replied, no_reply, or the reason they were dropped.",
    ),
    family(
        IN_FLIGHT,
        Kind::Gauge,
        Unit::Count,
        "Datagrams received and not finished yet.",
    ),
    family(
        RECEIVE_ERRORS,
        Kind::Counter,
        Unit::Count,
        "Receive calls that failed; the listener went on after each.",
    ),
    family(
        READS_PAUSED,
        Kind::Counter,
        Unit::Count,
        "Times a listener stopped reading because it had its share of max_in_flight in flight.",
    ),
    family(
        KERNEL_DROPS,
        Kind::Counter,
        Unit::Count,
        "Datagrams the kernel dropped because a socket's receive queue was full (Linux only).",
    ),
    family(
        UNREAD_AT_CLOSE,
        Kind::Counter,
        Unit::Count,
        "Datagrams still queued in a socket when it closed.",
    ),
    family(
        GROUP_COPIES_SKIPPED,
        Kind::Counter,
        Unit::Count,
        "Copies of broadcast and multicast datagrams left to the first listener.",
    ),
    family(
        HANDLING,
        Kind::Histogram,
        Unit::Seconds,
        "Time from a datagram's receipt to its outcome.",
    ),
];

const SESSION_FAMILIES: [Family; 5] = [
    family(
        SESSIONS_LIVE,
        Kind::Gauge,
        Unit::Count,
        "Sessions alive now.",
    ),
    family(
        SESSIONS_CREATED,
        Kind::Counter,
        Unit::Count,
        "Sessions started.",
    ),
    family(
        SESSIONS_ENDED,
        Kind::Counter,
        Unit::Count,
        "Sessions ended, by reason: closed, failed, panicked, shut_down, evicted.",
    ),
    family(
        SESSIONS_IDLE_TIMEOUTS,
        Kind::Counter,
        Unit::Count,
        "Idle timeouts that fired (Session::on_idle calls).",
    ),
    family(
        SESSIONS_DROPPED,
        Kind::Counter,
        Unit::Count,
        "Datagrams the sessions table dropped, by reason: refused (max_sessions live), queue_full.",
    ),
];

/// Gives `recorder` the HELP text and unit of `families`. Repeated every
/// round, as the recorder may be new; recorders keep the first.
fn describe(recorder: &dyn Recorder, families: &[Family]) {
    for family in families {
        let name = KeyName::from_const_str(family.name);
        let unit = Some(family.unit);
        let help = SharedString::const_str(family.help);
        match family.kind {
            Kind::Counter => recorder.describe_counter(name, unit, help),
            Kind::Gauge => recorder.describe_gauge(name, unit, help),
            Kind::Histogram => recorder.describe_histogram(name, unit, help),
        }
    }
}

/// The key of `name` with `labels`.
fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
    let labels: Vec<Label> = labels
        .iter()
        .map(|(key, value)| Label::new(*key, (*value).to_owned()))
        .collect();
    Key::from_parts(name, labels)
}

/// Counts that add up over the sources sharing a label.
pub(crate) trait Totals: Copy + Default {
    /// Adds `other`'s counts to these.
    fn add(&mut self, other: &Self);
    /// What stays counted once the source is gone: its gauges go to zero.
    fn retired(self) -> Self;
}

impl Totals for Stats {
    fn add(&mut self, other: &Self) {
        self.add(other);
    }

    fn retired(mut self) -> Self {
        self.in_flight = 0;
        self
    }
}

impl Totals for SessionStats {
    fn add(&mut self, other: &Self) {
        self.live += other.live;
        self.created += other.created;
        self.refused += other.refused;
        self.refused_per_source += other.refused_per_source;
        self.queue_full += other.queue_full;
        self.evicted += other.evicted;
        self.closed += other.closed;
        self.timed_out += other.timed_out;
        self.failed += other.failed;
        self.panicked += other.panicked;
        self.shut_down += other.shut_down;
    }

    fn retired(mut self) -> Self {
        self.live = 0;
        self
    }
}

/// Something whose counts are published: a server's listeners, a sessions
/// table.
pub(crate) trait Source<T> {
    /// Adds the counts now to `totals`.
    fn add_to(&self, totals: &mut T);
}

impl Source<Stats> for [Counters] {
    fn add_to(&self, totals: &mut Stats) {
        for listener in self {
            listener.add_to(totals);
        }
    }
}

/// The counts behind one label's series, process-wide: the live sources
/// under that label, and what the gone ones had counted.
struct Series<T, S: ?Sized, K> {
    label: String,
    keys: K,
    state: Mutex<SeriesState<T, S>>,
}

struct SeriesState<T, S: ?Sized> {
    retired: T,
    live: Vec<Weak<S>>,
}

impl<T: Totals, S: ?Sized + Source<T>, K> Series<T, S, K> {
    fn new(label: String, keys: K) -> Self {
        Self {
            label,
            keys,
            state: Mutex::new(SeriesState {
                retired: T::default(),
                live: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SeriesState<T, S>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a live source; says whether another live one has this label.
    fn join(&self, source: Weak<S>) -> bool {
        let mut state = self.lock();
        state.live.retain(|live| live.strong_count() > 0);
        let shared = !state.live.is_empty();
        state.live.push(source);
        shared
    }

    /// Keeps the final counts of a source that is going away.
    fn retire(&self, counts: T) {
        self.lock().retired.add(&counts.retired());
    }

    /// Computes the label's counts now and hands them to `publish`. The
    /// live sources are read outside the lock, held in `scratch` (kept by
    /// the caller so that rounds do not allocate) until `publish` is done:
    /// dropping the last handle to one retires it, which takes the lock and
    /// publishes its final counts, which must come after these, never
    /// before.
    fn publish_totals<R>(&self, scratch: &mut Vec<Arc<S>>, publish: impl FnOnce(&T) -> R) -> R {
        let mut totals = {
            let mut state = self.lock();
            state.live.retain(|live| live.strong_count() > 0);
            scratch.extend(state.live.iter().filter_map(Weak::upgrade));
            state.retired
        };
        for source in scratch.iter() {
            source.add_to(&mut totals);
        }
        let published = publish(&totals);
        scratch.clear();
        published
    }
}

/// Every label's series of one kind.
type Registry<T, S, K> = Mutex<Vec<Arc<Series<T, S, K>>>>;

/// The series of `label` in `registry`, made with `keys` if it is new.
/// Series are never removed: a source started again under a label goes on
/// from what the label counted (as the recorder keeps its series too).
fn claim<T: Totals, S: ?Sized + Source<T>, K>(
    registry: &Registry<T, S, K>,
    label: String,
    keys: impl FnOnce(&str) -> K,
) -> Arc<Series<T, S, K>> {
    let mut registry = registry.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(series) = registry.iter().find(|series| series.label == label) {
        return series.clone();
    }
    let keys = keys(&label);
    let series = Arc::new(Series::new(label, keys));
    registry.push(series.clone());
    series
}

type ServerSeries = Series<Stats, [Counters], ServerKeys>;
type SessionSource = dyn Source<SessionStats> + Send + Sync;
type SessionSeries = Series<SessionStats, SessionSource, SessionKeys>;

static SERVERS: Registry<Stats, [Counters], ServerKeys> = Mutex::new(Vec::new());
static SESSIONS: Registry<SessionStats, SessionSource, SessionKeys> = Mutex::new(Vec::new());

/// The keys of one server label's series.
struct ServerKeys {
    received: Key,
    received_bytes: Key,
    sent_bytes: Key,
    outcomes: [Key; Outcome::COUNT],
    in_flight: Key,
    receive_errors: Key,
    reads_paused: Key,
    kernel_drops: Key,
    unread_at_close: Key,
    group_copies_skipped: Key,
    handling: Key,
}

impl ServerKeys {
    fn new(label: &str) -> Self {
        let server = [(SERVER_LABEL, label)];
        Self {
            received: key(DATAGRAMS_RECEIVED, &server),
            received_bytes: key(RECEIVED_BYTES, &server),
            sent_bytes: key(SENT_BYTES, &server),
            outcomes: Outcome::NAMES
                .map(|outcome| key(DATAGRAMS, &[(SERVER_LABEL, label), ("outcome", outcome)])),
            in_flight: key(IN_FLIGHT, &server),
            receive_errors: key(RECEIVE_ERRORS, &server),
            reads_paused: key(READS_PAUSED, &server),
            kernel_drops: key(KERNEL_DROPS, &server),
            unread_at_close: key(UNREAD_AT_CLOSE, &server),
            group_copies_skipped: key(GROUP_COPIES_SKIPPED, &server),
            handling: key(HANDLING, &server),
        }
    }

    /// Sets every series of `stats` in `recorder`; returns the handle the
    /// listeners record handling times with until the next round.
    fn publish(&self, recorder: &dyn Recorder, stats: &Stats) -> Histogram {
        describe(recorder, &SERVER_FAMILIES);
        let counter =
            |key: &Key, value: u64| recorder.register_counter(key, &METADATA).absolute(value);
        counter(&self.received, stats.received);
        counter(&self.received_bytes, stats.bytes_received);
        counter(&self.sent_bytes, stats.bytes_sent);
        for (key, count) in self.outcomes.iter().zip(Outcome::counts(stats)) {
            counter(key, count);
        }
        recorder
            .register_gauge(&self.in_flight, &METADATA)
            .set(stats.in_flight as f64);
        counter(&self.receive_errors, stats.receive_errors);
        counter(&self.reads_paused, stats.reads_paused);
        // Where the system does not say, there is no series rather than a
        // misleading zero.
        if let Some(drops) = stats.kernel_drops {
            counter(&self.kernel_drops, drops);
        }
        counter(&self.unread_at_close, stats.unread_at_close);
        counter(&self.group_copies_skipped, stats.group_copies_skipped);
        recorder.register_histogram(&self.handling, &METADATA)
    }
}

/// What a server's listeners share with its publisher.
pub(crate) struct Server {
    /// From `Builder::name`; the label, if given.
    name: Option<String>,
    counters: OnceLock<Weak<[Counters]>>,
    /// Claimed when the first socket opens (the label may be its address).
    series: OnceLock<Arc<ServerSeries>>,
    /// Publish now: a socket opened or closed.
    wake: Notify,
    /// The server's listeners, and how many of their counters have gone:
    /// the last one publishes.
    listeners: usize,
    retired: AtomicUsize,
}

impl Server {
    pub(crate) fn new(name: Option<&str>, listeners: usize) -> Arc<Self> {
        Arc::new(Self {
            name: name.map(str::to_owned),
            counters: OnceLock::new(),
            series: OnceLock::new(),
            wake: Notify::new(),
            listeners,
            retired: AtomicUsize::new(0),
        })
    }

    /// The metrics part of one of this server's listeners.
    pub(crate) fn listener(self: &Arc<Self>) -> Listener {
        Listener {
            server: Some(self.clone()),
            handling: Mutex::new(Histogram::noop()),
            generation: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Starts publishing `counters`, on the current tokio runtime, until
    /// they are dropped.
    pub(crate) fn publish(self: Arc<Self>, counters: &Arc<[Counters]>) {
        let _ = self.counters.set(Arc::downgrade(counters));
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(publish_server(self))),
            Err(_) => tracing::warn!(
                target: LISTENER,
                "a server started outside a tokio runtime: its metrics are not published"
            ),
        }
    }
}

async fn publish_server(server: Arc<Server>) {
    let mut round = tokio::time::interval(PUBLISH_INTERVAL);
    round.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut scratch = Vec::new();
    loop {
        tokio::select! {
            _ = round.tick() => {}
            () = server.wake.notified() => {}
        }
        let Some(counters) = server.counters.get().and_then(Weak::upgrade) else {
            return;
        };
        let Some(series) = server.series.get() else {
            continue;
        };
        let handling = series.publish_totals(&mut scratch, |totals| {
            ::metrics::with_recorder(|recorder| series.keys.publish(recorder, totals))
        });
        for listener in counters.iter() {
            listener.metrics().set_handling(handling.clone());
        }
    }
}

/// The metrics part of a listener's [`Counters`].
pub(crate) struct Listener {
    /// `None` for counters of no server (unit tests).
    server: Option<Arc<Server>>,
    /// Where `abyss_handling_seconds` samples go, set by the publisher each
    /// round from the recorder installed then. The listener keeps its own
    /// copy ([`Handling`]) and takes this one only when `generation` says
    /// it changed: no lock per datagram.
    handling: Mutex<Histogram>,
    generation: std::sync::atomic::AtomicU64,
}

/// A listener driver's own handle on `abyss_handling_seconds`, refreshed
/// from its [`Listener`] when the publisher installs a new one.
#[derive(Default)]
pub(crate) struct Handling {
    generation: u64,
    histogram: Option<Histogram>,
}

impl fmt::Debug for Handling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handling")
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl Default for Listener {
    fn default() -> Self {
        Self {
            server: None,
            handling: Mutex::new(Histogram::noop()),
            generation: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let label = self
            .server
            .as_ref()
            .and_then(|server| server.series.get())
            .map(|series| series.label.as_str());
        f.debug_struct("Listener")
            .field("label", &label)
            .finish_non_exhaustive()
    }
}

impl Listener {
    /// Records one datagram's handling time through the driver's own
    /// handle, refreshed only when the publisher installed a new one (one
    /// relaxed load per datagram otherwise).
    pub(crate) fn record(&self, own: &mut Handling, seconds: f64) {
        let generation = self.generation.load(std::sync::atomic::Ordering::Acquire);
        if own.histogram.is_none() || own.generation != generation {
            own.histogram = Some(
                self.handling
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone(),
            );
            own.generation = generation;
        }
        if let Some(histogram) = &own.histogram {
            histogram.record(seconds);
        }
    }

    fn set_handling(&self, handling: Histogram) {
        let old = std::mem::replace(
            &mut *self.handling.lock().unwrap_or_else(PoisonError::into_inner),
            handling,
        );
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        drop(old);
    }

    /// A socket of this server opened, on `local`: the server's label is
    /// known from now on (its name, or else this address).
    pub(crate) fn attached(&self, local: std::io::Result<SocketAddr>) {
        let Some(server) = &self.server else {
            return;
        };
        let series = server.series.get_or_init(|| {
            let label = match (&server.name, local) {
                (Some(name), _) => name.clone(),
                (None, Ok(local)) => local.to_string(),
                (None, Err(_)) => "unknown".to_owned(),
            };
            let series = claim(&SERVERS, label, ServerKeys::new);
            if let Some(counters) = server.counters.get()
                && series.join(counters.clone())
            {
                tracing::warn!(
                    target: LISTENER,
                    server = %series.label,
                    "another running server has this metrics label: their series add up; give each its own `Builder::name` to tell them apart"
                );
            }
            series
        });
        // Handling times go to the recorder installed now from the first
        // datagram on, not only from the publisher's first round.
        self.set_handling(::metrics::with_recorder(|recorder| {
            recorder.register_histogram(&series.keys.handling, &METADATA)
        }));
        server.wake.notify_one();
    }

    /// A socket of this server closed: publish its last counts now.
    pub(crate) fn detached(&self) {
        if let Some(server) = &self.server {
            server.wake.notify_one();
        }
    }

    /// The listener's counters are going away: keep what they counted in
    /// the label's series; the server's last listener to go publishes the
    /// whole, as no round of the server's will (its publisher stops when
    /// it finds the counters gone). Publishing once per server, not once
    /// per listener, never shows a partial total.
    pub(crate) fn retire(&self, counters: &Counters) {
        let Some(server) = &self.server else {
            return;
        };
        let Some(series) = server.series.get() else {
            return;
        };
        let mut stats = Stats::default();
        counters.add_to(&mut stats);
        series.retire(stats);
        if server.retired.fetch_add(1, Ordering::AcqRel) + 1 >= server.listeners {
            drop(series.publish_totals(&mut Vec::new(), |totals| {
                ::metrics::with_recorder(|recorder| series.keys.publish(recorder, totals))
            }));
        }
    }
}

/// The keys of one sessions label's series.
struct SessionKeys {
    live: Key,
    created: Key,
    /// closed, failed, panicked, shut_down, evicted.
    ended: [Key; 5],
    idle_timeouts: Key,
    /// refused, queue_full.
    dropped: [Key; 2],
}

impl SessionKeys {
    fn new(label: &str) -> Self {
        let sessions = [(SESSIONS_LABEL, label)];
        let reason = |name, reason| key(name, &[(SESSIONS_LABEL, label), ("reason", reason)]);
        Self {
            live: key(SESSIONS_LIVE, &sessions),
            created: key(SESSIONS_CREATED, &sessions),
            ended: ["closed", "failed", "panicked", "shut_down", "evicted"]
                .map(|end| reason(SESSIONS_ENDED, end)),
            idle_timeouts: key(SESSIONS_IDLE_TIMEOUTS, &sessions),
            dropped: ["refused", "queue_full"].map(|why| reason(SESSIONS_DROPPED, why)),
        }
    }

    fn publish(&self, recorder: &dyn Recorder, stats: &SessionStats) {
        describe(recorder, &SESSION_FAMILIES);
        let counter =
            |key: &Key, value: u64| recorder.register_counter(key, &METADATA).absolute(value);
        recorder
            .register_gauge(&self.live, &METADATA)
            .set(stats.live as f64);
        counter(&self.created, stats.created);
        let ended = [
            stats.closed,
            stats.failed,
            stats.panicked,
            stats.shut_down,
            stats.evicted,
        ];
        for (key, count) in self.ended.iter().zip(ended) {
            counter(key, count);
        }
        counter(&self.idle_timeouts, stats.timed_out);
        for (key, count) in self.dropped.iter().zip([stats.refused, stats.queue_full]) {
            counter(key, count);
        }
    }
}

/// The metrics part of a sessions table.
pub(crate) struct Sessions {
    series: Arc<SessionSeries>,
    publishing: AtomicBool,
}

impl fmt::Debug for Sessions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sessions")
            .field("label", &self.series.label)
            .finish_non_exhaustive()
    }
}

impl Sessions {
    /// The metrics of a sessions table labelled `name`, or else by its
    /// number in the process: `1` for the first table built, `2`, ...
    pub(crate) fn new(name: Option<String>) -> Self {
        static BUILT: AtomicU64 = AtomicU64::new(1);
        let label = name.unwrap_or_else(|| BUILT.fetch_add(1, Ordering::Relaxed).to_string());
        Self {
            series: claim(&SESSIONS, label, SessionKeys::new),
            publishing: AtomicBool::new(false),
        }
    }

    /// Starts publishing the table `source` gives, on the current tokio
    /// runtime, once: until then, and outside a runtime, does nothing.
    pub(crate) fn publish(&self, source: impl FnOnce() -> Weak<SessionSource>) {
        if self.publishing.load(Ordering::Relaxed) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.publishing.swap(true, Ordering::Relaxed) {
            return;
        }
        let table = source();
        if self.series.join(table.clone()) {
            tracing::warn!(
                target: "abyss::session",
                sessions = %self.series.label,
                "another sessions table has this metrics label: their series add up; give each its own `SessionsBuilder::name` to tell them apart"
            );
        }
        drop(runtime.spawn(publish_sessions(self.series.clone(), table)));
    }

    /// The table is going away: keep what it counted in its label's
    /// series, and publish it, as its publisher will not again.
    pub(crate) fn retire(&self, stats: SessionStats) {
        self.series.retire(stats);
        self.series.publish_totals(&mut Vec::new(), |totals| {
            ::metrics::with_recorder(|recorder| self.series.keys.publish(recorder, totals))
        });
    }
}

async fn publish_sessions(series: Arc<SessionSeries>, table: Weak<SessionSource>) {
    let mut round = tokio::time::interval(PUBLISH_INTERVAL);
    round.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut scratch = Vec::new();
    loop {
        round.tick().await;
        if table.strong_count() == 0 {
            return;
        }
        series.publish_totals(&mut scratch, |totals| {
            ::metrics::with_recorder(|recorder| series.keys.publish(recorder, totals))
        });
    }
}
