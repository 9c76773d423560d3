//! The baseline Abyss is measured against: the plain tokio echo loop a
//! person would write by hand, `recv_from` then `send_to`, on a
//! current-thread runtime. No batching, no limits, no accounting.
//!
//! ```text
//! cargo run --release --example baseline_echo -- --bind 127.0.0.1:4100
//! ```

use std::net::SocketAddr;

use clap::Parser;
use tokio::net::UdpSocket;

/// A plain tokio UDP echo loop, the baseline for benchmarks.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address and port to serve on.
    #[arg(long, default_value = "127.0.0.1:4100")]
    bind: SocketAddr,
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let socket = UdpSocket::bind(args.bind).await?;
        println!("listening on {}", socket.local_addr()?);
        let mut buf = vec![0u8; 65_535];
        loop {
            // Errors (ICMP unreachable and the like) are skipped, as any
            // serious loop would. SIGINT/SIGTERM end the process.
            if let Ok((len, peer)) = socket.recv_from(&mut buf).await {
                let _ = socket.send_to(&buf[..len], peer).await;
            }
        }
    })
}
