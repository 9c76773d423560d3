//! A recursive DNS resolver: resolves each query iteratively from the root
//! servers, following referrals (with and without glue) and CNAME chains,
//! checking glue against the delegated zone, and caching answers for their
//! TTL.
//!
//! ```text
//! cargo run --example dns_recursive -- --bind 127.0.0.1:5301
//! dig @127.0.0.1 -p 5301 www.example.com
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use abyss::Server;
use abyss_examples::dns::{ROOT_SERVERS, Resolver, parse_root_hints, service};
use clap::Parser;

/// Recursive DNS resolver built on Abyss.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address and port to answer on.
    #[arg(long, default_value = "127.0.0.1:5301")]
    bind: SocketAddr,
    /// Root hints file (named.root format); default: the IANA root servers.
    #[arg(long)]
    root_hints: Option<std::path::PathBuf>,
    /// Port every authoritative server is asked on.
    #[arg(long, default_value_t = 53)]
    server_port: u16,
    /// Milliseconds to wait for each authoritative server.
    #[arg(long, default_value_t = 1500)]
    timeout_ms: u64,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    abyss_examples::init_tracing();
    abyss_examples::report(run(Args::parse()).await)
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    // Listen for Ctrl-C and SIGTERM before saying we are ready.
    let stop = abyss::shutdown_signal();
    let roots = match &args.root_hints {
        Some(path) => parse_root_hints(&std::fs::read_to_string(path)?),
        None => ROOT_SERVERS
            .iter()
            .map(|ip| ip.parse().expect("valid address"))
            .collect(),
    };
    if roots.is_empty() {
        return Err("the root hints name no IPv4 address".into());
    }
    let resolver = Arc::new(Resolver::new(
        roots,
        args.server_port,
        Duration::from_millis(args.timeout_ms),
    ));
    let handle = Server::bind(args.bind).serve(service(resolver)).await?;
    println!("listening on {}", handle.local_addr());
    let report = handle.shutdown_on(stop).await;
    println!("{}", abyss_examples::summary(&handle.stats(), &report));
    Ok(())
}
