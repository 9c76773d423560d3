//! Helpers shared by the example programs: logging set-up from `RUST_LOG`,
//! the shutdown signal, and the one-line stats summary.

pub mod counting;
pub mod dhcp;
pub mod dns;
pub mod dns_cookies;
pub mod dns_rrl;
pub mod mdns;

use std::fmt::Write as _;

use abyss::Stats;

/// Sends logs to stderr, filtered by `RUST_LOG` (default: `info`), so stdout
/// stays for the program's own output.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// The server's counters on one line, every drop reason by name.
///
/// ```
/// let line = abyss_examples::stats_line(&abyss::Stats::default());
/// assert!(line.starts_with("received=0 replied=0"));
/// ```
pub fn stats_line(stats: &Stats) -> String {
    let d = &stats.dropped;
    let mut line = format!(
        "received={} replied={} no_reply={} in_flight={} dropped={}",
        stats.received,
        stats.replied,
        stats.no_reply,
        stats.in_flight,
        d.total()
    );
    let reasons = [
        ("truncated", d.truncated),
        ("too_large", d.too_large),
        ("rate_limited", d.rate_limited),
        ("timed_out", d.timed_out),
        ("overloaded", d.overloaded),
        ("denied", d.denied),
        ("amplification", d.amplification),
        ("over_budget", d.over_budget),
        ("handler_error", d.handler_error),
        ("panicked", d.panicked),
        ("refused_destination", d.refused_destination),
        ("send_failed", d.send_failed),
        ("aborted", d.aborted),
    ];
    for (name, count) in reasons {
        let _ = write!(line, " {name}={count}");
    }
    let _ = write!(
        line,
        " receive_errors={} reads_paused={} kernel_drops={} unread_at_close={}",
        stats.receive_errors,
        stats.reads_paused,
        stats
            .kernel_drops
            .map_or_else(|| "n/a".to_owned(), |n| n.to_string()),
        stats.unread_at_close
    );
    if stats.group_copies_skipped > 0 {
        let _ = write!(line, " group_copies_skipped={}", stats.group_copies_skipped);
    }
    if stats.listener_restarts > 0 {
        let _ = write!(line, " listener_restarts={}", stats.listener_restarts);
    }
    line
}

/// Computes for about `micros` microseconds: stands in for a handler's CPU
/// work (parsing, crypto, a lookup) in benchmarks.
///
/// ```
/// let start = std::time::Instant::now();
/// abyss_examples::busy_work(200);
/// assert!(start.elapsed() >= std::time::Duration::from_micros(200));
/// ```
pub fn busy_work(micros: u64) {
    if micros == 0 {
        return;
    }
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_micros(micros) {
        std::hint::spin_loop();
    }
}

/// The line a program prints when it stops: its counters and what the
/// drain did with the requests in flight.
///
/// ```
/// let line = abyss_examples::summary(&abyss::Stats::default(), &abyss::DrainReport::default());
/// assert!(line.ends_with("drained=0"));
/// ```
pub fn summary(stats: &Stats, report: &abyss::DrainReport) -> String {
    // `aborted` is among the drop reasons already.
    format!("{} drained={}", stats_line(stats), report.drained)
}

/// Turns a program's result into its exit status, printing the error (with
/// its causes) on stderr.
pub fn report<E: std::error::Error + ?Sized>(result: Result<(), Box<E>>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            let mut line = format!("error: {error}");
            let mut source = error.source();
            while let Some(cause) = source {
                let _ = write!(line, ": {cause}");
                source = cause.source();
            }
            eprintln!("{line}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Serves the server's metrics (see the `metrics` feature of `abyss`) in
/// Prometheus' text format at `http://ADDR/metrics`, with
/// `abyss_handling_seconds` as a histogram (buckets from 10 µs to 10 s)
/// rather than the exporter's default summary, so that it adds up across
/// listeners and servers.
///
/// Call it before or after starting servers: they publish their counters
/// to whichever recorder is installed, within a second. Inside a tokio
/// runtime the exporter's HTTP listener runs on that runtime (and stops
/// with it); outside one, on a thread of its own.
pub fn install_prometheus(addr: std::net::SocketAddr) -> Result<(), Box<dyn std::error::Error>> {
    const HANDLING_BUCKETS: [f64; 13] = [
        1e-5, 2.5e-5, 1e-4, 2.5e-4, 1e-3, 2.5e-3, 0.01, 0.025, 0.1, 0.25, 1.0, 2.5, 10.0,
    ];
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full("abyss_handling_seconds".to_owned()),
            &HANDLING_BUCKETS,
        )?
        .install()?;
    Ok(())
}

/// A service for listeners that only print: each datagram is described by
/// `describe` (or noted as malformed, with `protocol` as the line's first
/// word) and handed to `sink`; nothing is ever replied.
pub fn printing_service(
    protocol: &'static str,
    describe: fn(std::net::SocketAddr, &[u8]) -> Option<String>,
    sink: impl Fn(String) + Clone + Send + Sync + 'static,
) -> impl tower::Service<
    abyss::Request,
    Response = Option<abyss::Bytes>,
    Error = std::convert::Infallible,
    Future = std::future::Ready<Result<Option<abyss::Bytes>, std::convert::Infallible>>,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |request: abyss::Request| {
        let line = describe(request.peer(), request.payload()).unwrap_or_else(|| {
            format!(
                "{protocol} malformed from {}: {} bytes",
                request.peer(),
                request.payload().len()
            )
        });
        sink(line);
        std::future::ready(Ok(None))
    })
}
