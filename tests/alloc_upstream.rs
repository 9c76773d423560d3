//! Counts heap allocations while the upstream client, and the DNS
//! forwarder built on it, answer: neither may allocate per request.
//!
//! The whole process is counted (a global allocator), so this binary holds
//! this one test only.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use abyss::upstream::{Correlate, Upstream};
use abyss::{Bytes, BytesMut, Server};
use abyss_examples::dns::{Forwarder, service};
use abyss_tests::CountingAllocator;
use tower::{Service, ServiceExt};

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

/// An upstream on its own thread that answers each datagram with itself,
/// the DNS response bit set (a blocking socket allocates nothing).
fn mirror_upstream() -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            if n > 2 {
                buf[2] |= 0x80;
            }
            let _ = socket.send_to(&buf[..n], from);
        }
    });
    addr
}

/// Requests and answers start with a 2-byte counter (the mirror marks
/// the third byte).
struct Counter(AtomicU64);

impl Correlate for Counter {
    type Key = u16;

    fn prepare(&self, request: &mut BytesMut) -> Option<u16> {
        let id = self.0.fetch_add(1, Ordering::Relaxed) as u16;
        request.get_mut(..2)?.copy_from_slice(&id.to_be_bytes());
        Some(id)
    }

    fn key(&self, answer: &[u8]) -> Option<u16> {
        Some(u16::from_be_bytes(answer.get(..2)?.try_into().ok()?))
    }
}

/// A DNS query for `host.example.test` with ID `id`.
fn query(id: u16) -> Vec<u8> {
    let mut query = id.to_be_bytes().to_vec();
    query.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in ["host", "example", "test"] {
        query.push(label.len() as u8);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    query
}

#[test]
fn upstream_requests_and_forwarded_queries_allocate_nothing() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let measured = 20_000u64;

    // The client alone, one request at a time.
    let upstream = runtime.block_on(async {
        Upstream::builder(mirror_upstream(), Counter(AtomicU64::new(0)))
            .build()
            .unwrap()
    });
    let request = Bytes::from_static(b"\0\0\0\0request body");
    let ask = |n: u64| {
        runtime.block_on(async {
            let mut upstream = upstream.clone();
            for _ in 0..n {
                let answer = upstream
                    .ready()
                    .await
                    .unwrap()
                    .call(request.clone())
                    .await
                    .unwrap();
                assert_eq!(&answer[4..], b"request body");
            }
        })
    };
    ask(2_000);
    let before = CountingAllocator::allocations();
    ask(measured);
    let client = CountingAllocator::allocations() - before;
    println!("upstream client: {client} allocations in {measured} requests");

    // The forwarder behind a server, queried by a blocking client.
    let handle = runtime.block_on(async {
        let forwarder = Forwarder::start(&[mirror_upstream()], Duration::from_secs(5)).unwrap();
        Server::bind("127.0.0.1:0")
            .listeners(1)
            .serve(service(Arc::new(forwarder)))
            .await
            .unwrap()
    });
    let server = handle.local_addr();
    let (done, finished) = tokio::sync::oneshot::channel();
    let querier = std::thread::spawn(move || {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        socket.connect(server).unwrap();
        let queries: Vec<Vec<u8>> = (0..=u16::MAX).map(query).collect();
        let mut buf = [0u8; 512];
        let mut round_trip = |i: u64| {
            let query = &queries[i as usize % queries.len()];
            socket.send(query).unwrap();
            let n = socket.recv(&mut buf).expect("a reply within 10 s");
            assert_eq!(&buf[..2], &query[..2], "the client's ID");
            assert_eq!(buf[3] & 0x0f, 0, "NOERROR");
            assert_eq!(&buf[12..n], &query[12..], "the client's question");
        };
        for i in 0..2_000 {
            round_trip(i);
        }
        let before = CountingAllocator::allocations();
        for i in 0..measured {
            round_trip(i);
        }
        let _ = done.send(CountingAllocator::allocations() - before);
    });
    let forwarded = runtime.block_on(finished).expect("the client finished");
    querier.join().unwrap();
    println!("forwarder: {forwarded} allocations in {measured} queries");
    runtime.block_on(handle.shutdown());

    // Requests and answers are copied into 64 KiB arenas, a new one now
    // and then; nothing else may allocate.
    assert!(
        client <= measured / 1_000,
        "{client} allocations in {measured} requests"
    );
    assert!(
        forwarded <= measured / 1_000,
        "{forwarded} allocations in {measured} forwarded queries"
    );
}
