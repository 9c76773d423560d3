//! Per-peer sessions: each peer gets its own counter, kept between its
//! datagrams. `reset` ends the session; a peer quiet for `--idle-secs` is
//! forgotten. Try: `nc -u 127.0.0.1 4001`, then type lines.
use abyss::session::{Session, SessionContext, Sessions, Step};
use abyss::{Request, Server};
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

struct Counter(u64);

impl Session for Counter {
    async fn handle(&mut self, request: Request) -> Step {
        if request.payload().trim_ascii() == b"reset" {
            return Step::close().reply("reset\n");
        }
        self.0 += 1;
        Step::keep().reply(format!("{}\n", self.0))
    }

    async fn on_idle(&mut self, context: &SessionContext) -> Step {
        tracing::info!(peer = %context.peer(), count = self.0, "forgetting a quiet peer");
        Step::close()
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    abyss_examples::init_tracing();
    abyss_examples::report(run(Args::parse()).await)
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    // Listen for Ctrl-C and SIGTERM before saying we are ready.
    let stop = abyss::shutdown_signal();
    let mut sessions = Sessions::builder(|_peer| Counter(0))
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
    let report = handle.shutdown_on(stop).await;
    println!("{}", abyss_examples::summary(&handle.stats(), &report));
    Ok(())
}
