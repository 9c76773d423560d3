//! Prints every DHCPv4 message that reaches port 67: binds 0.0.0.0:67 with
//! broadcast enabled (clients without an address broadcast from 0.0.0.0:68),
//! decodes each message and prints its type, client MAC, transaction ID
//! and requested options on one line. It answers nothing. Port 67 needs
//! root (or CAP_NET_BIND_SERVICE).
//!
//! ```text
//! sudo cargo run --example dump_dhcp
//! ```

use std::net::{Ipv4Addr, SocketAddr};

use abyss::Server;
use abyss::transport::UdpOptions;
use clap::Parser;

/// DHCP listener built on Abyss.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Port to listen on.
    #[arg(long, default_value_t = 67)]
    port: u16,
    /// Only listen on this interface (SO_BINDTODEVICE).
    #[arg(long)]
    interface: Option<String>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    abyss_examples::init_tracing();
    abyss_examples::report(run(Args::parse()).await)
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    // Listen for Ctrl-C and SIGTERM before saying we are ready.
    let stop = abyss::shutdown_signal();
    let mut options = UdpOptions::new().broadcast(true).reuse_address(true);
    if let Some(interface) = args.interface {
        options = options.bind_device(interface);
    }
    let handle = Server::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, args.port)))
        .listeners(1)
        .udp_options(options)
        .serve(abyss_examples::dhcp::service(|line| println!("{line}")))
        .await?;
    println!("listening on {}", handle.local_addr());
    let report = handle.shutdown_on(stop).await;
    println!("{}", abyss_examples::summary(&handle.stats(), &report));
    Ok(())
}
