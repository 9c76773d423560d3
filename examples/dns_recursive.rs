//! A recursive DNS resolver: resolves each query iteratively from the root
//! servers, following referrals (with and without glue) and CNAME chains,
//! checking glue against the delegated zone, and caching answers for their
//! TTL.
//!
//! ```text
//! cargo run --example dns_recursive -- --bind 127.0.0.1:5301
//! dig @127.0.0.1 -p 5301 www.example.com
//! ```
//!
//! `--rrl-responses-per-second N` turns on response rate limiting (see the
//! forwarder example).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use abyss::Server;
use abyss_examples::dns::{ROOT_SERVERS, Resolver, parse_root_hints, service};
use abyss_examples::dns_cookies::{self, ServerCookies};
use abyss_examples::dns_rrl::RrlArgs;
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
    /// Hours a DNS cookie secret is used before the next one (the one
    /// before stays valid for as long); 0 turns DNS cookies off.
    #[arg(long, default_value_t = 24)]
    cookie_rotation_hours: u64,
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
    // Clients that return a good DNS cookie own their address: response
    // rate limiting spares them.
    let cookies = (args.cookie_rotation_hours > 0).then(|| {
        Arc::new(ServerCookies::new(Duration::from_secs(
            args.cookie_rotation_hours * 3600,
        )))
    });
    let validated = cookies.as_ref().map(|cookies| cookies.validated());
    let rrl = args.rrl.limiter(move |peer: SocketAddr| {
        validated
            .as_ref()
            .is_some_and(|validated| abyss::middleware::Validate::is_validated(validated, peer))
    })?;
    let handle = Server::bind(args.bind)
        .serve(
            tower::ServiceBuilder::new()
                .option_layer(rrl.as_ref().map(|rrl| rrl.layer()))
                // One error and one reply type with the layer on or off.
                .map_err(Into::<abyss::BoxError>::into)
                .map_response(|reply: Option<abyss::Bytes>| reply.map(abyss::Reply::new))
                .service(match cookies {
                    Some(cookies) => {
                        tower::util::Either::Left(dns_cookies::service(resolver, cookies))
                    }
                    None => tower::util::Either::Right(service(resolver)),
                }),
        )
        .await?;
    println!("listening on {}", handle.local_addr());
    let report = handle.shutdown_on(stop).await;
    println!("{}", abyss_examples::summary(&handle.stats(), &report));
    Ok(())
}
