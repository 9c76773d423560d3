//! Counts heap allocations while a server answers datagrams: the driver and
//! the layers must not allocate per datagram.
//!
//! The whole process is counted (a global allocator), so this binary holds
//! this one test only.

use std::net::UdpSocket;

use std::time::Duration;

use abyss::Server;
use abyss::middleware::RateQuota;
use abyss_tests::{CountingAllocator, echo};

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

/// Round trips from one blocking client; returns the allocations counted
/// while the measured ones ran.
fn ping_pong(server: std::net::SocketAddr, warm_up: usize, measured: usize) -> u64 {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    socket.connect(server).unwrap();
    let mut buf = [0u8; 64];
    let mut round_trip = |i: usize| {
        let payload = (i as u64).to_be_bytes();
        socket.send(&payload).unwrap();
        let n = socket.recv(&mut buf).expect("a reply within 10 s");
        assert_eq!(&buf[..n], &payload);
    };
    for i in 0..warm_up {
        round_trip(i);
    }
    let before = CountingAllocator::allocations();
    for i in 0..measured {
        round_trip(i);
    }
    CountingAllocator::allocations() - before
}

/// Sends `count` datagrams over the size limit, then one round trip (the
/// server handles one socket's datagrams in order, so its reply means every
/// drop was handled); returns the allocations counted meanwhile.
fn oversized(server: std::net::SocketAddr, count: usize) -> u64 {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    socket.connect(server).unwrap();
    let big = [0u8; 520];
    let mut buf = [0u8; 64];
    let before = CountingAllocator::allocations();
    for i in 0..count {
        socket.send(&big).unwrap();
        if i % 64 == 63 {
            // Stay under the socket buffers: one round trip per 64.
            socket.send(b"sync").unwrap();
            socket.recv(&mut buf).expect("a reply within 10 s");
        }
    }
    socket.send(b"sync").unwrap();
    socket.recv(&mut buf).expect("a reply within 10 s");
    CountingAllocator::allocations() - before
}

#[test]
fn answering_a_datagram_through_the_full_stack_allocates_nothing() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let handle = runtime.block_on(async {
        Server::bind("127.0.0.1:0")
            .listeners(1)
            .trace(true)
            .max_packet_size(512)
            .rate_limit(RateQuota::per_second(1_000_000))
            .concurrency_shed(1024)
            .timeout(Duration::from_secs(5))
            .serve(echo())
            .await
            .unwrap()
    });
    let server = handle.local_addr();
    let measured = 20_000;
    let dropped = 6_400;
    let (done, finished) = tokio::sync::oneshot::channel();
    let client = std::thread::spawn(move || {
        let answered = ping_pong(server, 2_000, measured);
        let _ = done.send((answered, oversized(server, dropped)));
    });
    // Serve until the client reports.
    let (allocations, drop_allocations) = runtime.block_on(finished).expect("the client finished");
    client.join().unwrap();
    println!("{allocations} allocations in {measured} round trips");
    // The payload arena takes a new 64 KiB block now and then if a reply is
    // still held when the block runs out; nothing else may allocate.
    assert!(
        allocations <= (measured / 1_000) as u64,
        "{allocations} allocations in {measured} round trips"
    );
    println!("{drop_allocations} allocations for {dropped} dropped datagrams");
    // The arena's 64 KiB blocks (3.3 MB of payload here fill about 50) and
    // the first use of the drop events' call sites allocate; a drop itself
    // must not (a boxed error per drop would be 6 400).
    assert!(
        drop_allocations <= (dropped / 50) as u64,
        "a dropped datagram must not allocate: {drop_allocations} for {dropped}"
    );
    let stats = handle.stats();
    assert_eq!(stats.dropped.too_large, dropped as u64);
    assert_eq!(stats.replied, 22_000 + 101);
    runtime.block_on(handle.shutdown());
}
