//! Per-datagram cost of each layer, and of the full default stack, around an
//! inner service that answers at once. The figure that matters is the
//! difference to the `bare service` line, measured in the same run.
//!
//! `cargo bench -p abyss-middleware --bench layers`

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use std::future::{Future, Ready, ready};
use std::hint::black_box;
use std::net::SocketAddr;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use abyss_middleware::{
    ConcurrencyShedLayer, Datagram, PeerRateLimiter, RateQuota, SizeLimitLayer, TraceLayer,
};
use criterion::{Criterion, criterion_group, criterion_main};
use tower::{Layer, Service, ServiceBuilder};

/// A datagram as a server hands it on: stamped with its arrival time (one
/// clock read per receive batch in the server, none per layer).
#[derive(Clone, Copy)]
struct Packet {
    peer: SocketAddr,
    len: usize,
    at: std::time::Instant,
}

impl Datagram for Packet {
    fn peer(&self) -> SocketAddr {
        self.peer
    }
    fn local(&self) -> SocketAddr {
        "192.0.2.53:53".parse().unwrap()
    }
    fn payload_len(&self) -> usize {
        self.len
    }
    fn received_at(&self) -> std::time::Instant {
        self.at
    }
}

/// Answers every packet at once.
#[derive(Clone, Copy)]
struct Answer;

impl Service<Packet> for Answer {
    type Response = usize;
    type Error = std::convert::Infallible;
    type Future = Ready<Result<usize, std::convert::Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, packet: Packet) -> Self::Future {
        ready(Ok(packet.len))
    }
}

/// One datagram through `service`: poll_ready, call, poll the response.
fn one<S>(service: &mut S, cx: &mut Context<'_>, packet: Packet)
where
    S: Service<Packet>,
{
    assert!(service.poll_ready(cx).is_ready());
    let future = pin!(service.call(packet));
    let polled = future.poll(cx);
    assert!(polled.is_ready());
    let _ = black_box(polled);
}

fn bench<S: Service<Packet>>(c: &mut Criterion, name: &str, mut service: S, peers: &[SocketAddr]) {
    let mut cx = Context::from_waker(Waker::noop());
    let mut i = 0usize;
    let at = std::time::Instant::now();
    c.bench_function(name, |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            let packet = Packet {
                peer: peers[i % peers.len()],
                len: 64,
                at,
            };
            one(&mut service, &mut cx, black_box(packet));
        })
    });
}

/// Every layer alone, then the full stack.
fn layers(c: &mut Criterion) {
    // Timers (tower's Timeout) need a runtime's time driver.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _entered = runtime.enter();

    let one_peer: Vec<SocketAddr> = vec!["192.0.2.1:4000".parse().unwrap()];
    let many_peers: Vec<SocketAddr> = (0..4096u32)
        .map(|i| SocketAddr::from((std::net::Ipv4Addr::from(0x0a00_0000 + i), 4000)))
        .collect();
    let generous = RateQuota::per_second(1_000_000_000);

    bench(c, "bare service", Answer, &one_peer);
    bench(
        c,
        "size limit",
        SizeLimitLayer::new(8192).layer(Answer),
        &one_peer,
    );
    let limiter = PeerRateLimiter::new(generous).unwrap();
    bench(
        c,
        "rate limit, one peer",
        limiter.layer().layer(Answer),
        &one_peer,
    );
    let limiter = PeerRateLimiter::new(generous).unwrap();
    bench(
        c,
        "rate limit, 4096 peers",
        limiter.layer().layer(Answer),
        &many_peers,
    );
    // A flood of new sources against a full table (65 536 tracked) of
    // sources that are not idle (1 a second each): each datagram is from a
    // source never seen, which must look for a place or share the overflow.
    let strict = PeerRateLimiter::new(RateQuota::per_second(1)).unwrap();
    let mut strict_layer = strict.layer().layer(Answer);
    let mut cx = Context::from_waker(Waker::noop());
    let mut next = 0u32;
    // Arriving now: a source stays active for the second after its datagram.
    let mut new_peer = move || {
        next = next.wrapping_add(1);
        Packet {
            peer: SocketAddr::from((std::net::Ipv4Addr::from(0x0b00_0000 + next), 4000)),
            len: 64,
            at: std::time::Instant::now(),
        }
    };
    for _ in 0..70_000 {
        one(&mut strict_layer, &mut cx, new_peer());
    }
    c.bench_function("rate limit, a new peer each datagram, table full", |b| {
        b.iter(|| one(&mut strict_layer, &mut cx, black_box(new_peer())))
    });
    bench(
        c,
        "concurrency limit",
        ConcurrencyShedLayer::new(16_384).layer(Answer),
        &one_peer,
    );
    bench(
        c,
        "timeout (tower)",
        tower::timeout::TimeoutLayer::new(Duration::from_secs(5)).layer(Answer),
        &one_peer,
    );
    bench(
        c,
        "trace, no subscriber",
        TraceLayer::new().layer(Answer),
        &one_peer,
    );

    let limiter = PeerRateLimiter::new(generous).unwrap();
    let full = ServiceBuilder::new()
        .layer(TraceLayer::new())
        .layer(SizeLimitLayer::new(8192))
        .layer(limiter.layer())
        .layer(ConcurrencyShedLayer::new(16_384))
        .timeout(Duration::from_secs(5))
        .service(Answer);
    bench(c, "full stack, 4096 peers", full, &many_peers);
}

criterion_group!(benches, layers);
criterion_main!(benches);
