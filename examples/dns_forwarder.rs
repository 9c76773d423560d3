//! A DNS forwarder: answers each query by asking one upstream server.
//!
//! ```text
//! cargo run --example dns_forwarder -- --bind 127.0.0.1:5300 --upstream 127.0.0.1:53
//! dig @127.0.0.1 -p 5300 example.com
//! ```
//!
//! Upstream source ports and IDs are random; replies are matched by upstream
//! address, ID and question (spoofed ones are ignored); an upstream that does
//! not answer in time gives SERVFAIL; a malformed query gets FORMERR (or
//! nothing, without a whole header). Queries in flight are bounded by
//! `--max-outstanding`; beyond it they are dropped and counted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use abyss::Server;
use abyss_examples::dns::{Forwarder, first_nameserver, service};
use clap::Parser;

/// DNS forwarder built on Abyss.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address and port to answer on.
    #[arg(long, default_value = "127.0.0.1:5300")]
    bind: SocketAddr,
    /// Server to forward to (default: the first nameserver in /etc/resolv.conf).
    #[arg(long)]
    upstream: Option<SocketAddr>,
    /// Milliseconds to wait for the upstream before answering SERVFAIL.
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
    /// Queries being forwarded at once at most.
    #[arg(long, default_value_t = 1024)]
    max_outstanding: usize,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    abyss_examples::init_tracing();
    abyss_examples::report(run(Args::parse()).await)
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    // Listen for Ctrl-C and SIGTERM before saying we are ready.
    let stop = abyss::shutdown_signal();
    let upstream = match args.upstream {
        Some(upstream) => upstream,
        None => std::fs::read_to_string("/etc/resolv.conf")
            .ok()
            .as_deref()
            .and_then(first_nameserver)
            .ok_or("no --upstream given and no nameserver in /etc/resolv.conf")?,
    };
    let forwarder = Arc::new(Forwarder::new(
        upstream,
        Duration::from_millis(args.timeout_ms),
    ));
    let handle = Server::bind(args.bind)
        .concurrency_shed(args.max_outstanding)
        .serve(service(forwarder))
        .await?;
    println!(
        "listening on {} forwarding to {upstream}",
        handle.local_addr()
    );
    let report = handle.shutdown_on(stop).await;
    println!("{}", abyss_examples::summary(&handle.stats(), &report));
    Ok(())
}
