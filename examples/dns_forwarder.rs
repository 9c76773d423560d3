//! A DNS forwarder: answers each query by asking one upstream server.
//!
//! ```text
//! cargo run --example dns_forwarder -- --bind 127.0.0.1:5300 --upstream 127.0.0.1:53
//! dig @127.0.0.1 -p 5300 example.com
//! ```
//!
//! Queries go upstream through `abyss::upstream` with a random ID, the
//! question in random letter case (0x20), from a pool of random ports
//! rotated every 10 000 queries; answers are matched by upstream address,
//! socket, ID and exact question (spoofed ones are ignored), error answers
//! without a question by ID. Several `--upstream`s fail over in order; if
//! none answers in time the client gets SERVFAIL. Only standard queries
//! are forwarded (other opcodes get NOTIMP at once); a malformed query
//! gets FORMERR (or nothing, without a whole header); responses are never
//! answered. An unusable upstream (port 0, an unspecified address) is
//! refused at start. Answers over 3 times their query go to sources not
//! validated by a DNS cookie truncated (TC=1); such clients retry over
//! TCP, which the forwarder serves on the same address and forwards over
//! TCP (`--amplification-factor`, `--no-tcp`). Queries in flight are bounded by `--max-outstanding`;
//! beyond it they are dropped and counted.
//!
//! `--rrl-responses-per-second 5` turns on response rate limiting as BIND's
//! `rate-limit { responses-per-second 5; }` does: identical answers to one
//! client network beyond 5 a second are dropped, every second one sent
//! truncated (TC=1) instead (`--rrl-slip`, `--rrl-window-secs`,
//! `--rrl-log-only`). Clients that send DNS cookies (RFC 7873; `dig` does)
//! get server cookies (RFC 9018, secrets rotated every
//! `--cookie-rotation-hours`), and those that return a good one are exempt
//! from response rate limiting: their address is proven.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use abyss::Server;
use abyss_examples::dns::{Forwarder, first_nameserver, service};
use abyss_examples::dns_cookies::{self, ServerCookies};
use abyss_examples::dns_rrl::RrlArgs;
use clap::Parser;

/// DNS forwarder built on Abyss.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address and port to answer on.
    #[arg(long, default_value = "127.0.0.1:5300")]
    bind: SocketAddr,
    /// Server to forward to; several, in order of preference, fail over
    /// when one does not answer in time (default: the first nameserver in
    /// /etc/resolv.conf).
    #[arg(long)]
    upstream: Vec<SocketAddr>,
    /// Milliseconds to wait for the upstream before answering SERVFAIL.
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
    /// Queries being forwarded at once at most.
    #[arg(long, default_value_t = 1024)]
    max_outstanding: usize,
    /// Hours a DNS cookie secret is used before the next one (the one
    /// before stays valid for as long); 0 turns DNS cookies off.
    #[arg(long, default_value_t = 24)]
    cookie_rotation_hours: u64,
    /// Answers more than this many times the size of their query go to
    /// sources not yet validated (by a DNS cookie) truncated, TC=1, so the
    /// client retries over TCP; 0 turns it off.
    #[arg(long, default_value_t = 3)]
    amplification_factor: usize,
    /// Do not answer over TCP on the same address.
    #[arg(long)]
    no_tcp: bool,
    #[command(flatten)]
    rrl: RrlArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    abyss_examples::init_tracing();
    abyss_examples::report(run(Args::parse()).await)
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    // Listen for Ctrl-C and SIGTERM before saying we are ready.
    let stop = abyss::shutdown_signal();
    let upstreams = if args.upstream.is_empty() {
        vec![
            std::fs::read_to_string("/etc/resolv.conf")
                .ok()
                .as_deref()
                .and_then(first_nameserver)
                .ok_or("no --upstream given and no nameserver in /etc/resolv.conf")?,
        ]
    } else {
        args.upstream.clone()
    };
    // An upstream that cannot be used (port 0, an unspecified address) is
    // refused here, not answered with SERVFAIL forever.
    let forwarder = Arc::new(Forwarder::start(
        &upstreams,
        Duration::from_millis(args.timeout_ms),
    )?);
    // Clients that return a good DNS cookie own their address: response
    // rate limiting spares them.
    let cookies = (args.cookie_rotation_hours > 0).then(|| {
        Arc::new(ServerCookies::new(Duration::from_secs(
            args.cookie_rotation_hours * 3600,
        )))
    });
    let validated = cookies.as_ref().map(|cookies| cookies.validated());
    let is_validated: Arc<dyn abyss::middleware::Validate> = Arc::new(move |peer: SocketAddr| {
        validated
            .as_ref()
            .is_some_and(|validated| abyss::middleware::Validate::is_validated(validated, peer))
    });
    let rrl = args.rrl.limiter({
        let is_validated = is_validated.clone();
        move |peer: SocketAddr| is_validated.is_validated(peer)
    })?;
    // Truncated clients retry over TCP: serve it on the same address.
    if !args.no_tcp {
        let tcp = tokio::net::TcpListener::bind(args.bind).await?;
        tokio::spawn(abyss_examples::dns::serve_tcp(
            tcp,
            forwarder.clone(),
            Duration::from_secs(10),
        ));
    }
    let answering = match cookies {
        Some(cookies) => tower::util::Either::Left(dns_cookies::service(forwarder, cookies)),
        None => tower::util::Either::Right(service(forwarder)),
    };
    let factor = if args.amplification_factor == 0 {
        usize::MAX
    } else {
        args.amplification_factor
    };
    let handle = Server::bind(args.bind)
        .concurrency_shed(args.max_outstanding)
        .serve(
            tower::ServiceBuilder::new()
                .option_layer(rrl.as_ref().map(|rrl| rrl.layer()))
                // One error and one reply type with the layer on or off.
                .map_err(Into::<abyss::BoxError>::into)
                .map_response(|reply: Option<abyss::Bytes>| reply.map(abyss::Reply::new))
                .service(abyss_examples::dns::truncate_large(
                    answering,
                    factor,
                    is_validated,
                )),
        )
        .await?;
    println!(
        "listening on {} forwarding to {upstreams:?}",
        handle.local_addr()
    );
    let report = handle.shutdown_on(stop).await;
    println!("{}", abyss_examples::summary(&handle.stats(), &report));
    Ok(())
}
