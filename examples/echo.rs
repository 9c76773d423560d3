//! UDP echo server: every datagram is sent back to its sender.
//!
//! ```text
//! cargo run --release --example echo            # serves on 127.0.0.1:4000
//! echo hi | nc -u -w1 127.0.0.1 4000            # prints "hi"
//! ```
//!
//! Prints `listening on ADDR` on stdout once it answers; on Ctrl-C or SIGTERM
//! it shuts down gracefully and prints the final counters on one line.
//! `RUST_LOG=abyss=trace` shows every datagram.
//!
//! Restarted without losing a datagram: the running one offers its
//! sockets with `--handover-socket PATH`; `echo --take-over PATH` takes
//! them, starts serving, and the old one finishes what it has in flight and
//! exits 0 (add `--handover-socket PATH` to the new one for the next time).
//!
//! Socket-activated (systemd's `ListenDatagram=`, or
//! `systemd-socket-activate --datagram -l 127.0.0.1:4000 echo`), it serves
//! the socket it is given, with a listener per socket, and ignores
//! `--bind`, `--port` and `--listeners`.

use std::convert::Infallible;
use std::net::IpAddr;
use std::time::Duration;

use abyss::middleware::RateQuota;
use abyss::{Dispatch, Request, Server, UdpOptions};
use clap::Parser;
use tower::service_fn;

/// UDP echo server built on Abyss: every datagram is sent back to its sender.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to serve on.
    #[arg(long, default_value = "127.0.0.1")]
    bind: IpAddr,
    /// Port to serve on (0 picks a free one).
    #[arg(long, default_value_t = 4000)]
    port: u16,
    /// Listener sockets sharing the port (default: one per core).
    #[arg(long)]
    listeners: Option<usize>,
    /// Requests in flight at most, across listeners.
    #[arg(long, default_value_t = abyss::DEFAULT_MAX_IN_FLIGHT)]
    max_in_flight: usize,
    /// Seconds to finish requests in flight on shutdown.
    #[arg(long, default_value_t = 15)]
    shutdown_timeout: u64,
    /// Drop datagrams longer than this many bytes.
    #[arg(long, default_value_t = abyss::DEFAULT_MAX_PACKET_SIZE)]
    max_packet_size: usize,
    /// Datagrams per second allowed from each peer (IPv4 address, IPv6 /64).
    #[arg(long)]
    rate_limit: Option<u32>,
    /// Datagrams a quiet peer may send at once (default: the rate limit).
    #[arg(long, requires = "rate_limit")]
    rate_burst: Option<u32>,
    /// Drop requests not handled within this many milliseconds.
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// Drop datagrams that arrive while this many are being handled
    /// (`--concurrency-limit`, its former name, still works).
    #[arg(long, alias = "concurrency-limit")]
    concurrency_shed: Option<usize>,
    /// Handle each datagram in a tracing span (shown with RUST_LOG=abyss=debug).
    #[arg(long)]
    trace: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    /// Receive with UDP GRO (Linux): runs of same-sized datagrams from one
    /// peer arrive as one buffer.
    #[arg(long)]
    gro: bool,
    /// Run on one thread (a current-thread tokio runtime) instead of one
    /// worker per core.
    #[arg(long)]
    current_thread: bool,
    /// Busy work of about this many microseconds per datagram, inside the
    /// handler's future (to see where handlers run).
    #[arg(long, default_value_t = 0)]
    handler_cpu_us: u64,
    /// Where handlers run: auto, inline (on the listener) or spawn (on the
    /// runtime's workers).
    #[arg(long, default_value = "auto", value_parser = ["auto", "inline", "spawn"])]
    dispatch: String,
    /// Offer this server's sockets at this Unix socket path: a successor
    /// started with `--take-over PATH` takes them, and this one finishes
    /// what it has in flight and exits, with no datagram lost.
    #[arg(long, value_name = "PATH")]
    handover_socket: Option<std::path::PathBuf>,
    /// Take the sockets of the server offering them at this Unix socket
    /// path (its `--handover-socket`) instead of binding.
    #[arg(long, value_name = "PATH")]
    take_over: Option<std::path::PathBuf>,
    /// Serve with no middleware at all (not even the packet-size limit).
    #[arg(long, conflicts_with_all = ["rate_limit", "timeout_ms", "concurrency_shed", "trace"])]
    no_layers: bool,
}

fn main() -> std::process::ExitCode {
    abyss_examples::init_tracing();
    let args = Args::parse();
    // One thread needs no work stealing: a current-thread runtime wakes the
    // listener with less machinery.
    let runtime = if args.current_thread {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    };
    match runtime {
        Ok(runtime) => abyss_examples::report(runtime.block_on(run(args))),
        Err(error) => abyss_examples::report::<dyn std::error::Error>(Err(error.into())),
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    // Listen for Ctrl-C and SIGTERM before saying we are ready.
    let stop = abyss::shutdown_signal();
    if let Some(addr) = args.metrics {
        abyss_examples::install_prometheus(addr)?;
        eprintln!("metrics on http://{addr}/metrics");
    }
    let mut builder = Server::bind((args.bind, args.port))
        .max_in_flight(args.max_in_flight)
        .shutdown_timeout(Duration::from_secs(args.shutdown_timeout))
        .max_packet_size(args.max_packet_size);
    if let Some(listeners) = args.listeners {
        builder = builder.listeners(listeners);
    }
    if let Some(per_second) = args.rate_limit {
        let quota = RateQuota::per_second(per_second);
        builder = builder.rate_limit(match args.rate_burst {
            Some(burst) => quota.with_burst(burst),
            None => quota,
        });
    }
    if let Some(ms) = args.timeout_ms {
        builder = builder.timeout(Duration::from_millis(ms));
    }
    if let Some(max) = args.concurrency_shed {
        builder = builder.concurrency_shed(max);
    }
    if args.no_layers {
        builder = builder.without_packet_size_limit();
    }
    builder = builder.trace(args.trace);
    if args.gro {
        builder = builder.udp_options(UdpOptions::new().gro(true));
    }
    // Started by systemd (or `systemd-socket-activate --datagram -l ADDR`):
    // serve the socket it bound, on its address.
    if let Some(sockets) = abyss::transport::BoundSockets::from_systemd()? {
        builder = builder.bound_sockets(sockets);
    }
    // Taking over from a running server: serve its sockets.
    let predecessor = match &args.take_over {
        Some(path) => {
            let path = path.clone();
            let (sockets, stream) = tokio::task::spawn_blocking(move || {
                let stream = std::os::unix::net::UnixStream::connect(path)?;
                let sockets = abyss::transport::BoundSockets::receive(&stream)?;
                Ok::<_, std::io::Error>((sockets, stream))
            })
            .await??;
            builder = builder.bound_sockets(sockets);
            Some(stream)
        }
        None => None,
    };
    builder = builder.dispatch(match args.dispatch.as_str() {
        "inline" => Dispatch::Inline,
        "spawn" => Dispatch::Spawn,
        _ => Dispatch::Auto,
    });
    let cpu = args.handler_cpu_us;
    let echo = service_fn(move |request: Request| async move {
        if cpu > 0 {
            abyss_examples::busy_work(cpu);
        }
        Ok::<_, Infallible>(Some(request.into_payload()))
    });
    let handle = builder.serve(echo).await?;
    if let Some(stream) = &predecessor {
        abyss::successor_ready(stream)?;
    }
    println!("listening on {}", handle.local_addr());

    let report = match args.handover_socket {
        Some(path) => {
            // A successor that took over may offer its own at the same
            // path: the old one's file goes first.
            let _ = std::fs::remove_file(&path);
            let offers = tokio::net::UnixListener::bind(&path)?;
            let report = tokio::select! {
                report = handle.shutdown_on(stop) => report,
                report = hand_over(&handle, &offers) => report,
            };
            let _ = std::fs::remove_file(&path);
            report
        }
        None => handle.shutdown_on(stop).await,
    };
    println!("{}", abyss_examples::summary(&handle.stats(), &report));
    Ok(())
}

/// Hands the sockets to the first successor that takes them; a successor
/// that fails midway leaves this server serving, for the next one.
async fn hand_over(
    handle: &abyss::ServerHandle,
    offers: &tokio::net::UnixListener,
) -> abyss::DrainReport {
    loop {
        let stream = match offers.accept().await {
            Ok((stream, _)) => stream.into_std(),
            Err(error) => Err(error),
        };
        match stream {
            Ok(stream) => match handle.hand_over(stream).await {
                Ok(report) => {
                    eprintln!("handed over to a successor");
                    return report;
                }
                Err(error) => eprintln!("handover failed, still serving: {error}"),
            },
            Err(error) => eprintln!("handover connection failed: {error}"),
        }
    }
}
