use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::middleware::DropReason;

/// A snapshot of a server's counters, from [`ServerHandle::stats`](crate::ServerHandle::stats).
///
/// Every datagram a listener took from its socket is counted in `received`
/// and ends in exactly one of `replied`, `no_reply` or one reason of
/// `dropped`, or is still `in_flight`:
///
/// `received == replied + no_reply + dropped.total() + in_flight`
///
/// And every datagram the system accepted for the server's sockets was
/// either taken, dropped by the system, or still queued when its socket
/// closed (datagrams dropped before reaching a socket, for example to a
/// closed port, the system counts elsewhere):
///
/// `accepted == received + kernel_drops + unread_at_close`
///
/// (for broadcast and multicast, see `group_copies_skipped`). Counters
/// survive suspend/resume and only grow: [`Stats::since`] gives the
/// counts of an interval.
///
/// # Example
///
/// ```
/// use std::convert::Infallible;
/// use std::time::Duration;
/// use abyss::{Request, Server, service_fn};
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let echo = service_fn(|r: Request| async move { Ok::<_, Infallible>(r.into_payload()) });
/// let handle = Server::bind("127.0.0.1:0").serve(echo).await?;
/// abyss::client::send_recv(handle.local_addr(), b"ping", Duration::from_secs(5)).await?;
///
/// // In any snapshot, every datagram received is accounted for.
/// let stats = handle.stats();
/// assert_eq!(
///     stats.received,
///     stats.replied + stats.no_reply + stats.dropped.total() + stats.in_flight
/// );
///
/// handle.shutdown().await;
/// let stats = handle.stats();
/// assert_eq!((stats.received, stats.replied, stats.in_flight), (1, 1, 0));
/// # Ok(())
/// # }
/// ```
///
/// # Metrics
///
/// With the `metrics` feature, every server publishes these counts to the
/// [`metrics`](https://docs.rs/metrics) facade, with HELP text and units.
/// Every series has the label `server`: the server's
/// [`Builder::name`](crate::Builder::name), or else the address its first
/// socket was bound to (`127.0.0.1:5353`).
///
/// | metric | type, unit | counts |
/// | --- | --- | --- |
/// | `abyss_datagrams_received_total` | counter | `received` |
/// | `abyss_received_bytes_total` | counter, bytes | `bytes_received` |
/// | `abyss_sent_bytes_total` | counter, bytes | `bytes_sent` |
/// | `abyss_datagrams_total{outcome}` | counter | `replied`, `no_reply` and each reason of `dropped` (`truncated`, `too_large`, `rate_limited`, `timed_out`, `overloaded`, `amplification`, `over_budget`, `denied`, `handler_error`, `panicked`, `refused_destination`, `send_failed`, `aborted`) |
/// | `abyss_in_flight` | gauge | `in_flight` |
/// | `abyss_receive_errors_total` | counter | `receive_errors` |
/// | `abyss_reads_paused_total` | counter | `reads_paused` |
/// | `abyss_kernel_drops_total` | counter | `kernel_drops`; no series where the system does not report them |
/// | `abyss_unread_at_close_total` | counter | `unread_at_close` |
/// | `abyss_group_copies_skipped_total` | counter | `group_copies_skipped` |
/// | `abyss_handling_seconds` | histogram, seconds | each datagram's time from receipt to outcome |
///
/// A [`Sessions`](crate::session::Sessions) table publishes its
/// [`SessionStats`](crate::session::SessionStats) the same way, with the
/// label `sessions`: its
/// [`SessionsBuilder::name`](crate::session::SessionsBuilder::name), or
/// else its number in the process (`1` for the first table built).
///
/// | metric | type | counts |
/// | --- | --- | --- |
/// | `abyss_sessions_live` | gauge | `live` |
/// | `abyss_sessions_created_total` | counter | `created` |
/// | `abyss_sessions_ended_total{reason}` | counter | `closed`, `failed`, `panicked`, `shut_down`, `evicted` |
/// | `abyss_sessions_idle_timeouts_total` | counter | `timed_out` |
/// | `abyss_sessions_dropped_datagrams_total{reason}` | counter | `refused`, `queue_full` |
///
/// **A recorder installed before or after `serve()` gets the same
/// counts.** They are not fed to the facade datagram by datagram: each
/// listener counts in its own atomics (the ones this snapshot reads), and a
/// task of the server's, on the runtime it was started on, publishes their
/// totals every second and whenever a socket opens or closes, resolving
/// every handle from the recorder installed at that moment and setting it
/// (`Counter::absolute`, `Gauge::set`). So a recorder installed late gets
/// the counts since the start; a scrape is at most a second behind (less
/// than usual scrape intervals); and handling a datagram writes no atomic that
/// listeners on other cores share, and allocates nothing. The one
/// exception is the histogram: samples cannot be replayed, so each
/// listener records into a handle its server refreshes every second, and a
/// recorder installed late gets the handling times from then on.
///
/// Series are per label, for the life of the process: two running servers
/// given the same name add up (a warning says so), and a server started
/// again under the name of one that stopped goes on from its counts, as
/// a counter in one process should.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Datagrams taken from the sockets.
    pub received: u64,
    /// Payload bytes of the datagrams taken from the sockets.
    pub bytes_received: u64,
    /// Payload bytes of the replies the kernel took.
    pub bytes_sent: u64,
    /// Replies sent to peers.
    pub replied: u64,
    /// Datagrams the service handled and chose not to answer.
    pub no_reply: u64,
    /// Datagrams dropped, by reason.
    pub dropped: Drops,
    /// Datagrams received and not yet finished: waiting for the service,
    /// being handled, or with a reply waiting for the socket.
    pub in_flight: u64,
    /// Receive calls that failed (ICMP errors, `ENOBUFS`, ...); the listener
    /// goes on after each.
    pub receive_errors: u64,
    /// Times a listener stopped reading because it had its share of
    /// `max_in_flight` requests in flight; the kernel buffer holds (or drops,
    /// see `kernel_drops`) what arrives meanwhile.
    pub reads_paused: u64,
    /// Datagrams the kernel dropped because a socket's receive queue was
    /// full, where the system reports it (Linux `SO_MEMINFO`, read when the
    /// snapshot is taken); `None` elsewhere.
    pub kernel_drops: Option<u64>,
    /// Datagrams still queued in a socket when it closed (shutdown,
    /// suspend, or a listener replaced after a failure), read and counted
    /// then; the socket had stopped taking new ones.
    pub unread_at_close: u64,
    /// Copies of broadcast and multicast datagrams that reached a second or
    /// later listener's socket (the system gives every socket on the port
    /// its own copy) and were left to the first listener, which handles
    /// each such datagram once. Not counted in `received`.
    pub group_copies_skipped: u64,
    /// Listeners that ended by surprise (a panic outside the service) and
    /// were replaced by a new one on a new socket in the same group.
    pub listener_restarts: u64,
}

impl Stats {
    /// What happened between `earlier` and this snapshot: every counter
    /// less its value in `earlier` (`in_flight` stays as it is now).
    /// Counters only grow, so per-interval figures need no reset.
    ///
    /// ```
    /// let earlier = abyss::Stats::default();
    /// let mut now = abyss::Stats::default();
    /// now.received = 10;
    /// now.replied = 9;
    /// now.in_flight = 1;
    /// let delta = now.since(&earlier);
    /// assert_eq!((delta.received, delta.replied, delta.in_flight), (10, 9, 1));
    /// ```
    pub fn since(&self, earlier: &Stats) -> Stats {
        Stats {
            in_flight: self.in_flight,
            ..self.combine(earlier, u64::saturating_sub)
        }
    }

    /// Every counter of `self` with the same one of `other`, by `f`
    /// (`kernel_drops` is known if either knows it).
    fn combine(&self, other: &Stats, f: impl Fn(u64, u64) -> u64) -> Stats {
        let (d, o) = (&self.dropped, &other.dropped);
        Stats {
            received: f(self.received, other.received),
            bytes_received: f(self.bytes_received, other.bytes_received),
            bytes_sent: f(self.bytes_sent, other.bytes_sent),
            replied: f(self.replied, other.replied),
            no_reply: f(self.no_reply, other.no_reply),
            dropped: Drops {
                truncated: f(d.truncated, o.truncated),
                handler_error: f(d.handler_error, o.handler_error),
                panicked: f(d.panicked, o.panicked),
                refused_destination: f(d.refused_destination, o.refused_destination),
                send_failed: f(d.send_failed, o.send_failed),
                aborted: f(d.aborted, o.aborted),
                too_large: f(d.too_large, o.too_large),
                rate_limited: f(d.rate_limited, o.rate_limited),
                timed_out: f(d.timed_out, o.timed_out),
                overloaded: f(d.overloaded, o.overloaded),
                denied: f(d.denied, o.denied),
                amplification: f(d.amplification, o.amplification),
                over_budget: f(d.over_budget, o.over_budget),
            },
            in_flight: f(self.in_flight, other.in_flight),
            receive_errors: f(self.receive_errors, other.receive_errors),
            reads_paused: f(self.reads_paused, other.reads_paused),
            kernel_drops: match (self.kernel_drops, other.kernel_drops) {
                (None, None) => None,
                (a, b) => Some(f(a.unwrap_or(0), b.unwrap_or(0))),
            },
            unread_at_close: f(self.unread_at_close, other.unread_at_close),
            group_copies_skipped: f(self.group_copies_skipped, other.group_copies_skipped),
            listener_restarts: f(self.listener_restarts, other.listener_restarts),
        }
    }

    /// The field each [`Outcome`] is counted in, by [`Outcome::index`].
    fn outcomes_mut(&mut self) -> [&mut u64; Outcome::COUNT] {
        let d = &mut self.dropped;
        [
            &mut self.replied,
            &mut self.no_reply,
            &mut d.truncated,
            &mut d.handler_error,
            &mut d.panicked,
            &mut d.refused_destination,
            &mut d.send_failed,
            &mut d.aborted,
            &mut d.too_large,
            &mut d.rate_limited,
            &mut d.timed_out,
            &mut d.overloaded,
            &mut d.amplification,
            &mut d.over_budget,
            &mut d.denied,
        ]
    }
}

/// Dropped datagrams by reason; see [`Stats`].
///
/// Each reason says what to look at; so do the logs, at WARN or INFO from
/// the first drop of each reason on.
///
/// # Example
///
/// ```
/// use abyss::Drops;
///
/// fn advice(drops: &Drops) -> Option<&'static str> {
///     if drops.too_large > 0 {
///         Some("raise Builder::max_packet_size")
///     } else if drops.truncated > 0 {
///         Some("raise Builder::max_datagram_size")
///     } else if drops.handler_error + drops.panicked > 0 {
///         Some("read the handler's errors in the logs")
///     } else {
///         None
///     }
/// }
///
/// let mut drops = Drops::default(); // in a program: `handle.stats().dropped`
/// assert_eq!(advice(&drops), None);
/// drops.too_large = 1;
/// assert_eq!(advice(&drops), Some("raise Builder::max_packet_size"));
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Drops {
    /// Longer than `max_datagram_size`: cut short by the kernel, never handed
    /// to the service.
    pub truncated: u64,
    /// The service returned an error (or its `poll_ready` failed).
    pub handler_error: u64,
    /// The service panicked.
    pub panicked: u64,
    /// A reply to a source that cannot be answered: port 0, an unspecified,
    /// broadcast or multicast address.
    pub refused_destination: u64,
    /// The reply could not be sent (`ENOBUFS`, `EPERM`, unreachable).
    pub send_failed: u64,
    /// Still in flight when a shutdown or suspend deadline passed.
    pub aborted: u64,
    /// Over the size limit (size-limit layer).
    pub too_large: u64,
    /// Over the per-peer rate limit (rate-limit layer).
    pub rate_limited: u64,
    /// Handling timed out (timeout layer).
    pub timed_out: u64,
    /// Refused at the concurrency limit (concurrency-limit or load-shed layer).
    pub overloaded: u64,
    /// Refused by a policy layer (allow/deny list).
    pub denied: u64,
    /// A reply over the amplification limit for an unvalidated peer.
    pub amplification: u64,
    /// A reply over the server's reply budget
    /// ([`Builder::reply_budget`](crate::Builder::reply_budget)).
    pub over_budget: u64,
}

impl Drops {
    /// All dropped datagrams: the sum of every reason.
    ///
    /// # Example
    ///
    /// ```
    /// let mut drops = abyss::Drops::default();
    /// drops.rate_limited = 2;
    /// drops.timed_out = 1;
    /// assert_eq!(drops.total(), 3);
    /// ```
    pub fn total(&self) -> u64 {
        self.truncated
            + self.handler_error
            + self.panicked
            + self.refused_destination
            + self.send_failed
            + self.aborted
            + self.too_large
            + self.rate_limited
            + self.timed_out
            + self.overloaded
            + self.denied
            + self.amplification
            + self.over_budget
    }
}

/// Why a datagram did not get a reply, as counted by the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Replied,
    NoReply,
    Truncated,
    HandlerError,
    Panicked,
    RefusedDestination,
    SendFailed,
    Aborted,
    Layer(DropReason),
}

impl Outcome {
    /// How many outcomes are counted apart.
    pub(crate) const COUNT: usize = 15;

    /// Names of the counted outcomes, by [`Outcome::index`].
    pub(crate) const NAMES: [&'static str; Self::COUNT] = [
        "replied",
        "no_reply",
        "truncated",
        "handler_error",
        "panicked",
        "refused_destination",
        "send_failed",
        "aborted",
        "too_large",
        "rate_limited",
        "timed_out",
        "overloaded",
        "amplification",
        "over_budget",
        "denied",
    ];

    /// Every counted outcome, by [`Outcome::index`].
    #[cfg(test)]
    pub(crate) const ALL: [Outcome; Self::COUNT] = [
        Outcome::Replied,
        Outcome::NoReply,
        Outcome::Truncated,
        Outcome::HandlerError,
        Outcome::Panicked,
        Outcome::RefusedDestination,
        Outcome::SendFailed,
        Outcome::Aborted,
        Outcome::Layer(DropReason::TooLarge),
        Outcome::Layer(DropReason::RateLimited),
        Outcome::Layer(DropReason::TimedOut),
        Outcome::Layer(DropReason::Overloaded),
        Outcome::Layer(DropReason::Amplification),
        Outcome::Layer(DropReason::OverBudget),
        Outcome::Layer(DropReason::Denied),
    ];

    /// The slot this outcome is counted in. `DropReason` is non_exhaustive:
    /// a reason this driver does not know yet counts as a policy drop.
    pub(crate) fn index(self) -> usize {
        match self {
            Outcome::Replied => 0,
            Outcome::NoReply => 1,
            Outcome::Truncated => 2,
            Outcome::HandlerError => 3,
            Outcome::Panicked => 4,
            Outcome::RefusedDestination => 5,
            Outcome::SendFailed => 6,
            Outcome::Aborted => 7,
            Outcome::Layer(DropReason::TooLarge) => 8,
            Outcome::Layer(DropReason::RateLimited) => 9,
            Outcome::Layer(DropReason::TimedOut) => 10,
            Outcome::Layer(DropReason::Overloaded) => 11,
            Outcome::Layer(DropReason::Amplification) => 12,
            Outcome::Layer(DropReason::OverBudget) => 13,
            Outcome::Layer(_) => 14,
        }
    }

    /// The name logged with a datagram's outcome.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Outcome::Layer(reason) => reason.as_str(),
            other => Self::NAMES[other.index()],
        }
    }
}

impl std::fmt::Debug for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut stats = Stats::default();
        self.add_to(&mut stats);
        f.debug_tuple("Counters").field(&stats).finish()
    }
}

/// One listener's counters, on their own cache lines so listeners on
/// different cores do not contend.
#[derive(Default)]
#[repr(align(128))]
pub(crate) struct Counters {
    received: AtomicU64,
    bytes_received: AtomicU64,
    bytes_sent: AtomicU64,
    /// Finished datagrams, by [`Outcome::index`].
    outcomes: [AtomicU64; Outcome::COUNT],
    receive_errors: AtomicU64,
    reads_paused: AtomicU64,
    unread_at_close: AtomicU64,
    group_copies_skipped: AtomicU64,
    /// Kernel drops of sockets this listener had before (suspend/resume).
    kernel_drops: AtomicU64,
    kernel_drops_known: AtomicBool,
    /// The socket now in use, asked for its kernel drops at each snapshot.
    transport: std::sync::Mutex<Option<std::sync::Weak<dyn crate::transport::Transport>>>,
    /// The server's label and where handling times go; the counts above
    /// are published from a task of the server's (see `super::metrics`).
    #[cfg(feature = "metrics")]
    metrics: super::metrics::Listener,
}

/// What a listener counted is kept in its server's series when it goes.
#[cfg(feature = "metrics")]
impl Drop for Counters {
    fn drop(&mut self) {
        self.metrics.retire(self);
    }
}

impl Counters {
    /// The counters of a server's `listeners`, whose metrics (feature
    /// `metrics`) carry the label `name`, or else the server's address.
    pub(crate) fn for_server(listeners: usize, name: Option<&str>) -> std::sync::Arc<[Counters]> {
        #[cfg(feature = "metrics")]
        {
            let server = super::metrics::Server::new(name, listeners);
            let counters: std::sync::Arc<[Counters]> = (0..listeners)
                .map(|_| {
                    let mut counters = Counters::default();
                    counters.metrics = server.listener();
                    counters
                })
                .collect();
            server.publish(&counters);
            counters
        }
        #[cfg(not(feature = "metrics"))]
        {
            let _ = name;
            (0..listeners).map(|_| Counters::default()).collect()
        }
    }

    #[cfg(feature = "metrics")]
    pub(crate) fn metrics(&self) -> &super::metrics::Listener {
        &self.metrics
    }

    pub(crate) fn received(&self, n: u64, bytes: u64) {
        self.bytes_received.fetch_add(bytes, Ordering::Relaxed);
        self.received.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn sent(&self, bytes: u64) {
        self.bytes_sent.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Records how long a datagram took from receipt to its outcome.
    #[cfg(feature = "metrics")]
    pub(crate) fn handled(&self, own: &mut super::metrics::Handling, took: std::time::Duration) {
        self.metrics.record(own, took.as_secs_f64());
    }

    /// Counts `n` datagrams as finished with `outcome`. Release pairs with the
    /// Acquire in [`Counters::add_to`] so a snapshot never sees an outcome
    /// without the receive that preceded it.
    pub(crate) fn finished(&self, outcome: Outcome, n: u64) {
        self.outcomes[outcome.index()].fetch_add(n, Ordering::Release);
    }

    pub(crate) fn receive_error(&self) {
        self.receive_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn read_paused(&self) {
        self.reads_paused.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn unread_at_close(&self, n: u64) {
        if n > 0 {
            self.unread_at_close.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub(crate) fn group_copies_skipped(&self, n: u64) {
        if n > 0 {
            self.group_copies_skipped.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Counts every datagram received and not finished as aborted (its
    /// listener died with it); returns how many.
    pub(crate) fn abort_unfinished(&self) -> u64 {
        let finished: u64 = self
            .outcomes
            .iter()
            .map(|o| o.load(Ordering::Acquire))
            .sum();
        let unfinished = self
            .received
            .load(Ordering::Acquire)
            .saturating_sub(finished);
        self.finished(Outcome::Aborted, unfinished);
        unfinished
    }

    /// Takes `transport` as this listener's socket for kernel drop counts.
    pub(crate) fn attach(&self, transport: &std::sync::Arc<dyn crate::transport::Transport>) {
        *self.transport.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(std::sync::Arc::downgrade(transport));
        #[cfg(feature = "metrics")]
        self.metrics.attached(transport.local_addr());
    }

    /// The socket is closing: fold its kernel drops into the total, and
    /// stop asking it (unless another socket has taken its place).
    pub(crate) fn detach(&self, transport: &std::sync::Arc<dyn crate::transport::Transport>) {
        let mut slot = self.transport.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(drops) = transport.kernel_drops() {
            self.kernel_drops.fetch_add(drops, Ordering::Relaxed);
            self.kernel_drops_known.store(true, Ordering::Relaxed);
        }
        let this = std::sync::Arc::downgrade(transport);
        if slot.as_ref().is_some_and(|attached| attached.ptr_eq(&this)) {
            *slot = None;
        }
        drop(slot);
        #[cfg(feature = "metrics")]
        self.metrics.detached();
    }

    /// Stops asking `transport` for its kernel drops, without asking it
    /// once more (it failed).
    pub(crate) fn forget(&self, transport: &std::sync::Arc<dyn crate::transport::Transport>) {
        let mut slot = self.transport.lock().unwrap_or_else(|e| e.into_inner());
        let this = std::sync::Arc::downgrade(transport);
        if slot.as_ref().is_some_and(|attached| attached.ptr_eq(&this)) {
            *slot = None;
        }
    }

    /// Kernel drops so far: closed sockets' plus the open one's.
    fn kernel_drops_now(&self) -> Option<u64> {
        // Under the lock that `detach` takes: a socket's count is in `past`
        // or read live, never both.
        let slot = self.transport.lock().unwrap_or_else(|e| e.into_inner());
        let live = slot
            .as_ref()
            .and_then(std::sync::Weak::upgrade)
            .and_then(|t| t.kernel_drops());
        let known = self.kernel_drops_known.load(Ordering::Relaxed);
        let past = self.kernel_drops.load(Ordering::Relaxed);
        drop(slot);
        match (live, known) {
            (Some(live), _) => Some(past + live),
            (None, true) => Some(past),
            (None, false) => None,
        }
    }

    /// Adds this listener's counters to `stats`.
    pub(crate) fn add_to(&self, stats: &mut Stats) {
        let o: [u64; Outcome::COUNT] =
            std::array::from_fn(|i| self.outcomes[i].load(Ordering::Acquire));
        // Loaded after every outcome, so it is never smaller than their sum.
        let received = self.received.load(Ordering::Acquire);
        let finished: u64 = o.iter().sum();
        stats.received += received;
        stats.bytes_received += self.bytes_received.load(Ordering::Relaxed);
        stats.bytes_sent += self.bytes_sent.load(Ordering::Relaxed);
        stats.in_flight += received.saturating_sub(finished);
        for (field, n) in stats.outcomes_mut().into_iter().zip(o) {
            *field += n;
        }
        stats.receive_errors += self.receive_errors.load(Ordering::Relaxed);
        stats.reads_paused += self.reads_paused.load(Ordering::Relaxed);
        stats.unread_at_close += self.unread_at_close.load(Ordering::Relaxed);
        stats.group_copies_skipped += self.group_copies_skipped.load(Ordering::Relaxed);
        if let Some(drops) = self.kernel_drops_now() {
            *stats.kernel_drops.get_or_insert(0) += drops;
        }
    }
}

/// Sums, for the metrics of servers sharing a label.
#[cfg(feature = "metrics")]
impl Stats {
    /// Adds `other`'s counts to these (`kernel_drops` is known if either
    /// knows it).
    pub(crate) fn add(&mut self, other: &Stats) {
        *self = self.combine(other, |a, b| a + b);
    }
}

#[cfg(feature = "metrics")]
impl Outcome {
    /// The finished datagrams of `stats`, by [`Outcome::index`].
    pub(crate) fn counts(stats: &Stats) -> [u64; Self::COUNT] {
        let mut stats = *stats;
        stats.outcomes_mut().map(|n| *n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_layer_reason_is_counted_in_the_slot_named_after_it() {
        for reason in [
            DropReason::TooLarge,
            DropReason::RateLimited,
            DropReason::TimedOut,
            DropReason::Overloaded,
            DropReason::Amplification,
            DropReason::OverBudget,
            DropReason::Denied,
        ] {
            assert_eq!(
                Outcome::NAMES[Outcome::Layer(reason).index()],
                reason.as_str()
            );
        }
    }

    #[test]
    fn each_outcome_lands_in_its_own_field_of_the_stats() {
        let counters = Counters::default();
        let outcomes = Outcome::ALL;
        for (i, outcome) in outcomes.iter().enumerate() {
            assert_eq!(outcome.index(), i, "{outcome:?} is in its slot");
        }
        counters.received(105, 0);
        // Outcome i is counted i + 1 times, so every field has its own value.
        for (i, outcome) in outcomes.iter().enumerate() {
            counters.finished(*outcome, i as u64 + 1);
        }
        let mut stats = Stats::default();
        counters.add_to(&mut stats);
        let d = stats.dropped;
        assert_eq!((stats.replied, stats.no_reply), (1, 2));
        assert_eq!(
            [
                d.truncated,
                d.handler_error,
                d.panicked,
                d.refused_destination,
                d.send_failed,
                d.aborted,
                d.too_large,
                d.rate_limited,
                d.timed_out,
                d.overloaded,
                d.amplification,
                d.over_budget,
                d.denied
            ],
            [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
        );
        assert_eq!(stats.in_flight, 0);
    }

    #[cfg(feature = "metrics")]
    #[test]
    fn the_published_outcome_counts_are_the_ones_each_outcome_was_counted_in() {
        let counters = Counters::default();
        counters.received(105, 0);
        for (i, (name, outcome)) in Outcome::NAMES.iter().zip(Outcome::ALL).enumerate() {
            assert_eq!(outcome.as_str(), *name);
            counters.finished(outcome, i as u64 + 1);
        }
        let mut stats = Stats::default();
        counters.add_to(&mut stats);
        assert_eq!(
            Outcome::counts(&stats),
            std::array::from_fn(|i| i as u64 + 1),
            "published under the name of the outcome counted"
        );
    }

    #[cfg(feature = "metrics")]
    #[test]
    fn adding_stats_adds_every_field() {
        let counters = Counters::default();
        counters.received(200, 3000);
        counters.sent(700);
        for (i, outcome) in Outcome::ALL.into_iter().enumerate() {
            counters.finished(outcome, i as u64 + 1);
        }
        counters.receive_error();
        counters.read_paused();
        counters.unread_at_close(4);
        counters.group_copies_skipped(5);
        let mut one = Stats::default();
        counters.add_to(&mut one);
        one.kernel_drops = Some(6);
        one.listener_restarts = 7;
        assert!(one.in_flight > 0 && one.dropped.denied > 0, "{one:?}");
        let mut twice = one;
        twice.add(&one);
        // `since` takes away every counter (and keeps `in_flight`).
        let mut back = twice.since(&one);
        assert_eq!(back.in_flight, 2 * one.in_flight);
        back.in_flight = one.in_flight;
        assert_eq!(back, one, "twice: {twice:?}");
    }

    /// A transport that only reports a fixed kernel drop count.
    #[derive(Debug)]
    struct Drops(u64);

    impl crate::transport::Transport for Drops {
        fn poll_recv(
            &self,
            _cx: &mut std::task::Context<'_>,
            _bufs: &mut [std::io::IoSliceMut<'_>],
            _meta: &mut [crate::transport::RecvMeta],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::task::Poll::Pending
        }

        fn poll_send(
            &self,
            _cx: &mut std::task::Context<'_>,
            _transmits: &[crate::transport::Transmit<'_>],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::task::Poll::Pending
        }

        fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
            Ok(([127, 0, 0, 1], 1).into())
        }

        fn kernel_drops(&self) -> Option<u64> {
            Some(self.0)
        }
    }

    #[test]
    fn closing_an_old_socket_keeps_counting_the_one_that_replaced_it() {
        let counters = Counters::default();
        let old: std::sync::Arc<dyn crate::transport::Transport> = std::sync::Arc::new(Drops(3));
        let new: std::sync::Arc<dyn crate::transport::Transport> = std::sync::Arc::new(Drops(5));
        counters.attach(&old);
        counters.attach(&new);
        counters.detach(&old);
        let mut stats = Stats::default();
        counters.add_to(&mut stats);
        assert_eq!(
            stats.kernel_drops,
            Some(3 + 5),
            "the new socket is still asked"
        );
        counters.detach(&new);
        let mut stats = Stats::default();
        counters.add_to(&mut stats);
        assert_eq!(stats.kernel_drops, Some(8));
    }
}
