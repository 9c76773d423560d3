//! Per-datagram cost of the listener driver (receive, call, reply,
//! account), with and without the full middleware stack, on a transport
//! that costs nothing: every receive call returns a full batch at once and
//! every send succeeds. What is left is Abyss's own work per datagram.
//!
//! `cargo bench -p abyss --bench driver`

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use std::convert::Infallible;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use abyss::middleware::RateQuota;
use abyss::transport::{Bind, RecvMeta, Transmit, Transport};
use abyss::{Request, Server};
use criterion::{Criterion, criterion_group, criterion_main};
use tokio::sync::Notify;

/// Hands out `budget` 64-byte datagrams from 64 peers, 32 per call, and
/// swallows replies, telling `sent_all` when `target` replies went out.
#[derive(Debug, Default)]
struct Shared {
    budget: AtomicU64,
    sent: AtomicU64,
    target: AtomicU64,
    waker: Mutex<Option<Waker>>,
    sent_all: Notify,
}

#[derive(Debug)]
struct Instant0(Arc<Shared>);

impl Transport for Instant0 {
    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let shared = &self.0;
        let budget = shared.budget.load(Ordering::Acquire);
        if budget == 0 {
            *shared.waker.lock().unwrap() = Some(cx.waker().clone());
            // Re-check after registering, so a refill is never missed.
            if shared.budget.load(Ordering::Acquire) == 0 {
                return Poll::Pending;
            }
        }
        let n =
            (bufs.len().min(meta.len()) as u64).min(shared.budget.load(Ordering::Acquire)) as usize;
        for i in 0..n {
            bufs[i][..64].fill(i as u8);
            meta[i] = RecvMeta::new(SocketAddr::from(([10, 0, 0, (i % 64) as u8 + 1], 4000)), 64);
        }
        shared.budget.fetch_sub(n as u64, Ordering::AcqRel);
        Poll::Ready(Ok(n))
    }

    fn poll_send(
        &self,
        _cx: &mut Context<'_>,
        transmits: &[Transmit<'_>],
    ) -> Poll<io::Result<usize>> {
        let shared = &self.0;
        let sent = shared
            .sent
            .fetch_add(transmits.len() as u64, Ordering::AcqRel)
            + transmits.len() as u64;
        if sent >= shared.target.load(Ordering::Acquire) {
            shared.sent_all.notify_one();
        }
        Poll::Ready(Ok(transmits.len()))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok("10.0.0.53:53".parse().unwrap())
    }

    fn max_receive_batch(&self) -> usize {
        32
    }

    fn max_transmit_batch(&self) -> usize {
        32
    }
}

#[derive(Debug, Clone)]
struct Once(Arc<Shared>);

impl Bind for Once {
    fn bind_group(&self, _addr: SocketAddr, count: usize) -> io::Result<Vec<Arc<dyn Transport>>> {
        assert_eq!(count, 1);
        Ok(vec![Arc::new(Instant0(self.0.clone()))])
    }
}

fn bench(c: &mut Criterion, name: &str, builder: impl Fn(abyss::Builder) -> abyss::Builder) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let shared = Arc::new(Shared::default());
    let handle = runtime.block_on(async {
        let echo =
            tower::service_fn(|r: Request| async move { Ok::<_, Infallible>(r.into_payload()) });
        builder(
            Server::bind("10.0.0.53:53")
                .listeners(1)
                .transport(Once(shared.clone())),
        )
        .serve(echo)
        .await
        .unwrap()
    });
    c.bench_function(name, |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let start = Instant::now();
                let target = shared.sent.load(Ordering::Acquire) + iters;
                shared.target.store(target, Ordering::Release);
                shared.budget.fetch_add(iters, Ordering::AcqRel);
                if let Some(waker) = shared.waker.lock().unwrap().take() {
                    waker.wake();
                }
                // notify_one keeps a permit, so no wake-up is lost; a stale
                // one only means another look at the count.
                while shared.sent.load(Ordering::Acquire) < target {
                    shared.sent_all.notified().await;
                }
                start.elapsed()
            })
        })
    });
    runtime.block_on(handle.shutdown());
}

fn driver(c: &mut Criterion) {
    bench(c, "driver, echo, no layers", |b| {
        b.without_packet_size_limit()
    });
    bench(c, "driver, echo, full default stack", |b| {
        b.trace(true)
            .max_packet_size(8192)
            .rate_limit(RateQuota::per_second(1_000_000_000))
            .concurrency_shed(16_384)
            .timeout(Duration::from_secs(5))
    });
}

criterion_group!(benches, driver);
criterion_main!(benches);
