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
    /// Busy work of about this many microseconds per datagram.
    #[arg(long, default_value_t = 0)]
    handler_cpu_us: u64,
    /// Spawn a task per datagram on a multi-threaded runtime (the naive
    /// way to use every core) instead of answering in the loop.
    #[arg(long)]
    spawn: bool,
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let runtime = if args.spawn {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    };
    runtime.block_on(async {
        let socket = UdpSocket::bind(args.bind).await?;
        println!("listening on {}", socket.local_addr()?);
        let socket = std::sync::Arc::new(socket);
        let cpu = args.handler_cpu_us;
        let mut buf = vec![0u8; 65_535];
        loop {
            // Errors (ICMP unreachable and the like) are skipped, as any
            // serious loop would. SIGINT/SIGTERM end the process.
            let Ok((len, peer)) = socket.recv_from(&mut buf).await else {
                continue;
            };
            if args.spawn {
                let payload = buf[..len].to_vec();
                let socket = socket.clone();
                tokio::spawn(async move {
                    abyss_examples::busy_work(cpu);
                    let _ = socket.send_to(&payload, peer).await;
                });
            } else {
                abyss_examples::busy_work(cpu);
                let _ = socket.send_to(&buf[..len], peer).await;
            }
        }
    })
}
