//! Per-peer sessions: each peer gets its own counter, kept between its
//! datagrams. `reset` ends the session; a peer quiet for `--idle-secs` is
//! forgotten. Try: `nc -u 127.0.0.1 4001`, then type lines.
use abyss::Server;
use abyss::session::Sessions;
use abyss_examples::counting::{Counter, log_forgotten};
use clap::Parser;
use std::time::Duration;

/// Counts each peer's datagrams, one session per peer.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address and port to serve on.
    #[arg(long, default_value = "127.0.0.1:4001")]
    bind: std::net::SocketAddr,
    /// Seconds a quiet peer's session lives.
    #[arg(long, default_value_t = 60)]
    idle_secs: u64,
    /// Sessions at most.
    #[arg(long, default_value_t = 16_384)]
    max_sessions: usize,
    /// Sessions one source (IPv4 address, IPv6 /64) may hold at most
    /// (default a sixteenth of --max-sessions); raise it for peers behind a
    /// NAT, or for a load generator on one address.
    #[arg(long)]
    max_sessions_per_source: Option<usize>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    abyss_examples::init_tracing();
    abyss_examples::report(run(Args::parse()).await)
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    // Listen for Ctrl-C and SIGTERM before saying we are ready.
    let stop = abyss::shutdown_signal();
    let mut sessions = Sessions::builder(|_peer| Counter::default())
        .idle_timeout(Duration::from_secs(args.idle_secs))
        .max_sessions(args.max_sessions);
    if let Some(share) = args.max_sessions_per_source {
        sessions = sessions.max_sessions_per_source(share);
    }
    let sessions = sessions.build()?;
    let ending = sessions.clone();
    let handle = Server::bind(args.bind)
        .on_shutdown(move || ending.shutdown())
        .serve(sessions.service())
        .await?;
    println!("listening on {}", handle.local_addr());
    // One line per 10 s at most says how many quiet peers were forgotten.
    let summary = tokio::spawn(log_forgotten(sessions.clone(), Duration::from_secs(10)));
    let report = handle.shutdown_on(stop).await;
    summary.abort();
    println!("{}", abyss_examples::summary(&handle.stats(), &report));
    Ok(())
}
