//! Prints every mDNS message on the local link: joins 224.0.0.251 and
//! ff02::fb on port 5353 (sharing the port with any other mDNS software),
//! decodes each message and prints its questions and answers on one line.
//!
//! ```text
//! cargo run --example dump_mdns
//! dig @224.0.0.251 -p 5353 printer.local      # in another terminal
//! ```

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use abyss::Server;
use abyss::transport::{MulticastV4, MulticastV6, UdpOptions};
use clap::Parser;

/// mDNS listener built on Abyss.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Port to listen on.
    #[arg(long, default_value_t = 5353)]
    port: u16,
    /// Address of the interface to join 224.0.0.251 on (0.0.0.0: the system's choice).
    #[arg(long, default_value = "0.0.0.0")]
    interface: Ipv4Addr,
    /// Index of the interface to join ff02::fb on (0: the system's choice);
    /// IPv6 is skipped if joining fails.
    #[arg(long, default_value_t = 0)]
    interface_v6: u32,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    abyss_examples::init_tracing();
    abyss_examples::report(run(Args::parse()).await)
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    // Listen for Ctrl-C and SIGTERM before saying we are ready.
    let stop = abyss::shutdown_signal();
    let print = |line: String| println!("{line}");
    let shared = UdpOptions::new().reuse_address(true).share_port(true);
    let v4 = Server::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, args.port)))
        .listeners(1)
        .udp_options(
            shared
                .clone()
                .join_multicast_v4(MulticastV4::new(
                    Ipv4Addr::new(224, 0, 0, 251),
                    args.interface,
                ))
                .multicast_loop_v4(true),
        )
        .serve(abyss_examples::mdns::service(print))
        .await?;
    println!("listening on {} (224.0.0.251)", v4.local_addr());
    let v6 = Server::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, args.port)))
        .listeners(1)
        .udp_options(
            shared
                .only_v6(true)
                .join_multicast_v6(MulticastV6::new("ff02::fb".parse()?, args.interface_v6))
                .multicast_loop_v6(true),
        )
        .serve(abyss_examples::mdns::service(print))
        .await;
    match &v6 {
        Ok(handle) => println!("listening on {} (ff02::fb)", handle.local_addr()),
        Err(error) => tracing::warn!(%error, "no IPv6 mDNS"),
    }
    v4.shutdown_on(stop).await;
    if let Ok(v6) = v6 {
        v6.shutdown().await;
    }
    Ok(())
}
