//! Reloading configuration while serving: answers every datagram with the
//! greeting in a file, and reads the file again on SIGHUP, without closing
//! its socket or dropping a datagram (datagrams in flight finish with the
//! old greeting).
//!
//! ```text
//! echo hello > /tmp/greeting
//! cargo run --example greeter -- --config /tmp/greeting &
//! echo hi | nc -u -w1 127.0.0.1 4002        # hello
//! echo bonjour > /tmp/greeting; kill -HUP %1
//! echo hi | nc -u -w1 127.0.0.1 4002        # bonjour
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use abyss::reload::Reloadable;
use abyss::{Bytes, Request, Server, service_fn};
use clap::Parser;

/// Answers every datagram with the greeting in a file; SIGHUP rereads it.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address and port to serve on.
    #[arg(long, default_value = "127.0.0.1:4002")]
    bind: SocketAddr,
    /// The file holding the greeting (its first line).
    #[arg(long)]
    config: PathBuf,
}

/// The greeting in `path`, or why it cannot be read.
fn read_greeting(path: &Path) -> std::io::Result<Bytes> {
    let text = std::fs::read_to_string(path)?;
    Ok(Bytes::from(format!(
        "{}\n",
        text.lines().next().unwrap_or_default()
    )))
}

/// The service for one configuration: a layer stack could be rebuilt here
/// just as well (rate, limits, handler), all replaced together.
fn greeter(
    greeting: Bytes,
) -> impl abyss::Service<
    Request,
    Response = Bytes,
    Error = Infallible,
    Future = impl Future<Output = Result<Bytes, Infallible>> + Send,
> + Clone
+ Send
+ 'static {
    service_fn(move |_: Request| {
        let greeting = greeting.clone();
        async move { Ok::<_, Infallible>(greeting) }
    })
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    abyss_examples::init_tracing();
    abyss_examples::report(run(Args::parse()).await)
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    // Listen for Ctrl-C, SIGTERM and SIGHUP before saying we are ready.
    let stop = abyss::shutdown_signal();
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let (service, reloader) = Reloadable::new(greeter(read_greeting(&args.config)?));
    let handle = Server::bind(args.bind).serve(service).await?;
    println!("listening on {}", handle.local_addr());
    let reloading = tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            // A configuration that cannot be read leaves the running one.
            match read_greeting(&args.config) {
                Ok(greeting) => {
                    reloader.replace(greeter(greeting));
                    tracing::info!(generation = reloader.generation(), "configuration reloaded");
                }
                Err(error) => tracing::warn!(%error, "configuration not reloaded"),
            }
        }
    });
    let report = handle.shutdown_on(stop).await;
    reloading.abort();
    println!("{}", abyss_examples::summary(&handle.stats(), &report));
    Ok(())
}
