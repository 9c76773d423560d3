//! A load generator for any UDP echo-style server: N sockets (distinct
//! source ports), a window of requests in flight per socket, a warm-up,
//! then a measured run. Reports replies per second, losses, and round-trip
//! percentiles on one line (or as JSON).
//!
//! ```text
//! cargo run --release --example loadgen -- --target 127.0.0.1:4000 --sockets 8 --window 8 --duration 10
//! cargo run --release --example loadgen -- --target 127.0.0.1:4000 --ping-pong   # latency: one in flight
//! ```
//!
//! It sends and receives with Abyss's own transport, so on Linux each
//! system call moves a batch (`recvmmsg`/`sendmmsg`), and runs on one
//! thread: pin it to its own core (`taskset -c 0`) away from the server.
//! Each request carries a sequence number and its send time; a socket that
//! hears nothing for `--loss-timeout-ms` counts what it has outstanding as
//! lost and refills its window.

use std::future::poll_fn;
use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use abyss::transport::{RecvMeta, Transmit, Transport, UdpOptions, UdpTransport};
use clap::Parser;
use hdrhistogram::Histogram;
use tokio::time::Instant;

/// UDP load generator for echo-style servers.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Server to load.
    #[arg(long, default_value = "127.0.0.1:4000")]
    target: SocketAddr,
    /// Client sockets, each with its own source port.
    #[arg(long, default_value_t = 8)]
    sockets: usize,
    /// Requests in flight per socket.
    #[arg(long, default_value_t = 8)]
    window: usize,
    /// Measured seconds (more than 0, at most a day).
    #[arg(long, default_value_t = 10.0, value_parser = seconds(false))]
    duration: f64,
    /// Seconds of load before measuring (0 to a day).
    #[arg(long, default_value_t = 1.0, value_parser = seconds(true))]
    warmup: f64,
    /// Payload bytes (at least 16).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// One socket, one request in flight: measures latency.
    #[arg(long)]
    ping_pong: bool,
    /// Milliseconds of silence after which a socket's outstanding requests
    /// count as lost.
    #[arg(long, default_value_t = 200)]
    loss_timeout_ms: u64,
    /// Print one JSON object instead of a line.
    #[arg(long)]
    json: bool,
    /// Send each window refill as one GSO super-datagram (Linux UDP_SEGMENT)
    /// that the kernel splits into separate datagrams: the load generator
    /// then spends less CPU per datagram than the server it measures.
    #[arg(long)]
    gso: bool,
    /// Count every datagram from the server as a reply, whatever it holds,
    /// for servers that answer without echoing (the counter example):
    /// replies are counted, latencies are not.
    #[arg(long)]
    any_reply: bool,
}

/// What one socket saw during the measured window.
#[derive(Default)]
struct Tally {
    sent: u64,
    replies: u64,
    lost: u64,
    histogram: Option<Histogram<u64>>,
}

/// A parser of a number of seconds, finite, not negative, at most a day,
/// and above zero unless `zero_ok`.
fn seconds(zero_ok: bool) -> impl Fn(&str) -> Result<f64, String> + Clone {
    move |text: &str| {
        let value: f64 = text
            .parse()
            .map_err(|_| format!("{text:?} is not a number of seconds"))?;
        if !(0.0..=86_400.0).contains(&value) {
            return Err(format!("{text} is not between 0 and 86400 seconds"));
        }
        if value == 0.0 && !zero_ok {
            return Err("must be more than 0 seconds".to_owned());
        }
        Ok(value)
    }
}

fn main() -> std::process::ExitCode {
    let mut args = Args::parse();
    if args.ping_pong {
        args.sockets = 1;
        args.window = 1;
    }
    if args.size < 16 || args.sockets == 0 || args.window == 0 {
        eprintln!("error: --size must be at least 16, --sockets and --window at least 1");
        return std::process::ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    abyss_examples::report(runtime.block_on(run(args)))
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(args.warmup);
    let measure_until = measure_from + Duration::from_secs_f64(args.duration);
    let local: SocketAddr = if args.target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..args.sockets {
        let transport = Arc::new(UdpTransport::bind(local, &UdpOptions::new())?);
        let load = Load {
            window: args.window,
            size: args.size,
            gso: args.gso,
            any_reply: args.any_reply,
            loss_timeout: Duration::from_millis(args.loss_timeout_ms),
        };
        tasks.push(tokio::spawn(drive(
            transport,
            args.target,
            load,
            (start, measure_from, measure_until),
        )));
    }
    let mut total = Tally {
        histogram: Some(new_histogram()),
        ..Tally::default()
    };
    for task in tasks {
        let tally = task.await.map_err(std::io::Error::other)??;
        total.sent += tally.sent;
        total.replies += tally.replies;
        total.lost += tally.lost;
        if let (Some(all), Some(one)) = (&mut total.histogram, &tally.histogram) {
            all.add(one).map_err(std::io::Error::other)?;
        }
    }
    let histogram = total.histogram.expect("set above");
    let per_second = total.replies as f64 / args.duration;
    let us = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    let fields = [
        ("replies_per_second", format!("{per_second:.0}")),
        ("sent", total.sent.to_string()),
        ("replies", total.replies.to_string()),
        ("lost", total.lost.to_string()),
        ("p50_us", format!("{:.1}", us(0.5))),
        ("p99_us", format!("{:.1}", us(0.99))),
        ("p999_us", format!("{:.1}", us(0.999))),
        ("sockets", args.sockets.to_string()),
        ("window", args.window.to_string()),
        ("size", args.size.to_string()),
    ];
    let line: Vec<String> = if args.json {
        fields
            .iter()
            .map(|(name, value)| format!("\"{name}\":{value}"))
            .collect()
    } else {
        fields
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect()
    };
    if args.json {
        println!("{{{}}}", line.join(","));
    } else {
        println!("{}", line.join(" "));
    }
    Ok(())
}

fn new_histogram() -> Histogram<u64> {
    // 1 ns to 60 s, three significant digits.
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds")
}

/// What one socket sends: see [`Args`].
struct Load {
    window: usize,
    size: usize,
    gso: bool,
    any_reply: bool,
    loss_timeout: Duration,
}

/// Keeps `window` requests in flight on one socket until `until`.
async fn drive(
    transport: Arc<UdpTransport>,
    target: SocketAddr,
    load: Load,
    (start, from, until): (Instant, Instant, Instant),
) -> std::io::Result<Tally> {
    let Load {
        window,
        size,
        gso,
        any_reply,
        loss_timeout,
    } = load;
    let mut tally = Tally {
        histogram: Some(new_histogram()),
        ..Tally::default()
    };
    let histogram = tally.histogram.as_mut().expect("set above");
    let batch = transport.max_receive_batch().min(32);
    let mut payloads = vec![vec![0u8; size]; window.max(batch)];
    let mut super_datagram = vec![0u8; size * window];
    let mut recv_bufs = vec![vec![0u8; size.max(2048)]; batch];
    let mut meta = vec![RecvMeta::default(); batch];
    let mut seq = 0u64;
    let mut outstanding = 0usize;
    let mut last_heard = Instant::now();

    loop {
        let now = Instant::now();
        if now >= until {
            break;
        }
        // Refill the window in one batch.
        let missing = window - outstanding;
        if missing > 0 {
            let stamp = now.duration_since(start).as_nanos() as u64;
            for payload in payloads.iter_mut().take(missing) {
                payload[..8].copy_from_slice(&seq.to_be_bytes());
                payload[8..16].copy_from_slice(&stamp.to_be_bytes());
                seq += 1;
            }
            let transmits: Vec<Transmit<'_>> = if gso && missing > 1 {
                for (chunk, payload) in super_datagram.chunks_mut(size).zip(&payloads[..missing]) {
                    chunk.copy_from_slice(payload);
                }
                let mut transmit = Transmit::new(target, &super_datagram[..size * missing]);
                transmit.segment_size = Some(size);
                vec![transmit]
            } else {
                payloads[..missing]
                    .iter()
                    .map(|p| Transmit::new(target, p))
                    .collect()
            };
            let mut done = 0;
            while done < transmits.len() {
                match poll_fn(|cx| transport.poll_send(cx, &transmits[done..])).await {
                    Ok(n) => done += n.max(1),
                    // A refused or failed send is a lost request.
                    Err(_) => {
                        done += 1;
                        if now >= from {
                            tally.lost += 1;
                        }
                        outstanding = outstanding.saturating_sub(1);
                    }
                }
            }
            outstanding += missing;
            if now >= from {
                tally.sent += missing as u64;
            }
        }
        // Wait for replies, or give up on the outstanding ones.
        let deadline = (last_heard + loss_timeout).min(until);
        let received = tokio::time::timeout_at(
            deadline,
            poll_fn(|cx| {
                let mut bufs: Vec<IoSliceMut<'_>> =
                    recv_bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
                transport.poll_recv(cx, &mut bufs, &mut meta)
            }),
        )
        .await;
        let arrived = Instant::now();
        match received {
            Ok(Ok(n)) => {
                last_heard = arrived;
                let now_ns = arrived.duration_since(start).as_nanos() as u64;
                for (m, buf) in meta.iter().zip(&recv_bufs).take(n) {
                    if m.peer != target {
                        continue;
                    }
                    if any_reply {
                        outstanding = outstanding.saturating_sub(1);
                        if arrived >= from {
                            tally.replies += 1;
                        }
                        continue;
                    }
                    if m.len < 16 {
                        continue;
                    }
                    outstanding = outstanding.saturating_sub(1);
                    let sent_ns = u64::from_be_bytes(buf[8..16].try_into().expect("8 bytes"));
                    if arrived >= from && sent_ns >= from.duration_since(start).as_nanos() as u64 {
                        tally.replies += 1;
                        let _ = histogram.record(now_ns.saturating_sub(sent_ns).max(1));
                    }
                }
            }
            Ok(Err(_)) => {} // an ICMP error from an earlier send: keep going
            Err(_) => {
                if arrived >= until {
                    break;
                }
                if arrived >= from {
                    tally.lost += outstanding as u64;
                }
                outstanding = 0;
                last_heard = arrived;
            }
        }
    }
    tally.lost += outstanding as u64;
    Ok(tally)
}
