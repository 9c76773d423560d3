//! The upstream client against fake upstreams on loopback: matching,
//! spoofed and late answers, deadlines, the outstanding bound, rotation.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use abyss::upstream::{Correlate, Upstream, UpstreamError};
use abyss::{Bytes, BytesMut};
use tokio::net::UdpSocket;
use tower::{Service, ServiceExt};

/// Requests and answers start with an 8-byte ID, chosen per request.
struct Tagged(AtomicU64);

impl Tagged {
    fn new() -> Self {
        Self(AtomicU64::new(0x5eed))
    }
}

impl Correlate for Tagged {
    type Key = u64;

    fn prepare(&self, request: &mut BytesMut) -> Option<u64> {
        // Not random, but unique: the tests check matching, not guessing.
        let id = self.0.fetch_add(0x9e37_79b9, Ordering::Relaxed);
        request.get_mut(..8)?.copy_from_slice(&id.to_be_bytes());
        Some(id)
    }

    fn key(&self, answer: &[u8]) -> Option<u64> {
        Some(u64::from_be_bytes(answer.get(..8)?.try_into().ok()?))
    }
}

fn request(body: &[u8]) -> Bytes {
    let mut bytes = vec![0u8; 8];
    bytes.extend_from_slice(body);
    Bytes::from(bytes)
}

/// An upstream that answers each request with itself, after `delay`, and
/// records the source ports it saw.
async fn echo_upstream(delay: Duration) -> (SocketAddr, Arc<std::sync::Mutex<Vec<SocketAddr>>>) {
    let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let addr = socket.local_addr().unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            record.lock().unwrap().push(from);
            let (socket, answer) = (socket.clone(), buf[..n].to_vec());
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = socket.send_to(&answer, from).await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_each_get_their_own_answer() {
    let (addr, _) = echo_upstream(Duration::ZERO).await;
    // 64 outstanding at most: a burst of 500 would overflow the fake
    // upstream's socket buffer, and a lost datagram is a timeout.
    let upstream = Upstream::builder(addr, Tagged::new())
        .max_outstanding(64)
        .build()
        .unwrap();
    let mut asks = tokio::task::JoinSet::new();
    for i in 0..500u32 {
        let upstream = upstream.clone();
        asks.spawn(async move {
            let body = i.to_be_bytes();
            let answer = upstream.oneshot(request(&body)).await.unwrap();
            assert_eq!(&answer[8..], &body, "request {i} got its own answer");
        });
    }
    while let Some(done) = asks.join_next().await {
        done.unwrap();
    }
    let stats = upstream.stats();
    assert_eq!(
        (stats.sent, stats.answered, stats.unmatched),
        (500, 500, 0),
        "{stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_from_elsewhere_or_with_unknown_keys_are_dropped_and_counted() {
    // The upstream answers late; a spoofer answers first, from another
    // address, with every key it could guess.
    let (addr, seen) = echo_upstream(Duration::from_millis(200)).await;
    let upstream = Upstream::builder(addr, Tagged::new())
        .sockets(1)
        .build()
        .unwrap();
    let asking = tokio::spawn(upstream.clone().oneshot(request(b"real")));
    // Wait until the request reached the upstream, to know its port.
    let port = loop {
        if let Some(from) = seen.lock().unwrap().first() {
            break *from;
        }
        tokio::task::yield_now().await;
    };
    let spoofer = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    for id in [0x5eedu64, 1, 2] {
        let mut forged = id.to_be_bytes().to_vec();
        forged.extend_from_slice(b"forged");
        spoofer.send_to(&forged, port).await.unwrap();
    }
    let answer = asking.await.unwrap().unwrap();
    assert_eq!(&answer[8..], b"real");
    // The forged datagrams were counted (they may still be in flight).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while upstream.stats().unmatched < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            upstream.stats()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(upstream.stats().answered, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_upstream_times_out_and_a_late_answer_is_unmatched() {
    let (addr, _) = echo_upstream(Duration::from_millis(300)).await;
    let upstream = Upstream::builder(addr, Tagged::new())
        .timeout(Duration::from_millis(50))
        .build()
        .unwrap();
    let error = upstream
        .clone()
        .oneshot(request(b"late"))
        .await
        .unwrap_err();
    assert!(matches!(error, UpstreamError::TimedOut), "{error}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while upstream.stats().unmatched < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            upstream.stats()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stats = upstream.stats();
    assert_eq!((stats.timed_out, stats.answered), (1, 0), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_its_outstanding_bound_the_client_is_not_ready() {
    let (addr, _) = echo_upstream(Duration::from_millis(300)).await;
    let mut upstream = Upstream::builder(addr, Tagged::new())
        .max_outstanding(2)
        .build()
        .unwrap();
    let first = upstream.ready().await.unwrap().call(request(b"1"));
    let second = upstream.ready().await.unwrap().call(request(b"2"));
    let mut third = upstream.clone();
    assert!(
        futures_util::FutureExt::now_or_never(third.ready()).is_none(),
        "two outstanding: not ready for a third"
    );
    first.await.unwrap();
    // One answered: ready again.
    tokio::time::timeout(Duration::from_secs(5), third.ready())
        .await
        .expect("ready once one is answered")
        .unwrap();
    second.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_are_replaced_by_fresh_ports_after_their_share() {
    let (addr, seen) = echo_upstream(Duration::ZERO).await;
    let upstream = Upstream::builder(addr, Tagged::new())
        .sockets(1)
        .rotate_after(10)
        .build()
        .unwrap();
    for i in 0..35u32 {
        upstream
            .clone()
            .oneshot(request(&i.to_be_bytes()))
            .await
            .unwrap();
    }
    let ports: std::collections::BTreeSet<u16> =
        seen.lock().unwrap().iter().map(SocketAddr::port).collect();
    assert_eq!(ports.len(), 4, "a fresh port every 10 requests: {ports:?}");
    assert_eq!(upstream.stats().rotations, 3);
}

#[tokio::test]
async fn an_unusable_upstream_is_refused_at_start() {
    for addr in ["127.0.0.1:0", "0.0.0.0:53", "[::]:53"] {
        let refused = Upstream::builder(addr.parse().unwrap(), Tagged::new()).build();
        assert!(refused.is_err(), "{addr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_compose_with_towers_balance_retry_and_load_shed() {
    use tower::balance::p2c::Balance;
    use tower::discover::ServiceList;
    use tower::load::Constant;

    // Two upstreams behind power-of-two-choices balancing.
    let (first, seen_first) = echo_upstream(Duration::ZERO).await;
    let (second, seen_second) = echo_upstream(Duration::ZERO).await;
    let clients = [first, second]
        .map(|addr| Constant::new(Upstream::builder(addr, Tagged::new()).build().unwrap(), 1));
    let mut balanced = Balance::new(ServiceList::new(clients));
    for i in 0..200u32 {
        let answer = balanced
            .ready()
            .await
            .unwrap()
            .call(request(&i.to_be_bytes()))
            .await
            .unwrap();
        assert_eq!(&answer[8..], &i.to_be_bytes());
    }
    let (a, b) = (
        seen_first.lock().unwrap().len(),
        seen_second.lock().unwrap().len(),
    );
    assert_eq!(a + b, 200);
    assert!(a > 0 && b > 0, "both upstreams used: {a} and {b}");

    // Retry: a request that times out on a silent upstream is tried again.
    #[derive(Clone)]
    struct Twice(usize);
    impl tower::retry::Policy<Bytes, BytesMut, UpstreamError> for Twice {
        type Future = std::future::Ready<()>;
        fn retry(
            &mut self,
            _request: &mut Bytes,
            result: &mut Result<BytesMut, UpstreamError>,
        ) -> Option<Self::Future> {
            match result {
                Err(UpstreamError::TimedOut) if self.0 > 0 => {
                    self.0 -= 1;
                    Some(std::future::ready(()))
                }
                _ => None,
            }
        }
        fn clone_request(&mut self, request: &Bytes) -> Option<Bytes> {
            Some(request.clone())
        }
    }
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let upstream = Upstream::builder(silent.local_addr().unwrap(), Tagged::new())
        .timeout(Duration::from_millis(30))
        .build()
        .unwrap();
    let retried = tower::ServiceBuilder::new()
        .retry(Twice(2))
        .service(upstream.clone());
    let error = retried.oneshot(request(b"lost")).await.unwrap_err();
    assert!(matches!(error, UpstreamError::TimedOut));
    assert_eq!(upstream.stats().sent, 3, "tried three times");

    // Timeout: tower's deadline over the client's own.
    let bounded = tower::ServiceBuilder::new()
        .timeout(Duration::from_millis(10))
        .service(upstream.clone());
    let error = bounded.oneshot(request(b"lost")).await.unwrap_err();
    assert!(
        error.is::<tower::timeout::error::Elapsed>(),
        "tower's timeout, before the client's 30 ms: {error}"
    );

    // LoadShed: at the outstanding bound, a request fails at once.
    let slow = Upstream::builder(silent.local_addr().unwrap(), Tagged::new())
        .max_outstanding(1)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut shed = tower::ServiceBuilder::new().load_shed().service(slow);
    let _waiting = shed.ready().await.unwrap().call(request(b"1"));
    let refused = shed.ready().await.unwrap().call(request(b"2")).await;
    assert!(refused.is_err(), "shed at the bound");
}

/// Keys are the request's first byte, kept as sent: tests choose them.
struct FirstByte;

impl Correlate for FirstByte {
    type Key = u8;

    fn prepare(&self, request: &mut BytesMut) -> Option<u8> {
        request.first().copied()
    }

    fn key(&self, answer: &[u8]) -> Option<u8> {
        answer.first().copied()
    }
}

#[tokio::test]
async fn an_answered_request_finishing_late_leaves_a_newer_one_with_its_key_waiting() {
    let fake = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut upstream = Upstream::builder(fake.local_addr().unwrap(), FirstByte)
        .sockets(1)
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let mut a = Box::pin(
        upstream
            .ready()
            .await
            .unwrap()
            .call(Bytes::from_static(b"\x07A")),
    );
    let mut buf = [0u8; 64];
    let (n, from) = tokio::select! {
        received = fake.recv_from(&mut buf) => received.unwrap(),
        early = &mut a => panic!("{early:?}"),
    };
    fake.send_to(&buf[..n], from).await.unwrap();
    while upstream.stats().answered < 1 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A's answer is delivered, but A's future has not run since: B takes
    // the same key.
    let mut b = Box::pin(
        upstream
            .ready()
            .await
            .unwrap()
            .call(Bytes::from_static(b"\x07B")),
    );
    tokio::select! {
        received = fake.recv_from(&mut buf) => { received.unwrap(); }
        early = &mut b => panic!("{early:?}"),
    }
    assert!(a.await.is_ok());
    // A's end must not remove B's entry: B waits its whole timeout.
    let started = tokio::time::Instant::now();
    let b = b.await;
    assert!(matches!(b, Err(UpstreamError::TimedOut)), "{b:?}");
    assert!(started.elapsed() >= Duration::from_millis(250), "B waited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_up_to_max_answer_are_read_whole() {
    let fake = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = fake.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 64];
        while let Ok((n, from)) = fake.recv_from(&mut buf).await {
            let mut big = buf[..n].to_vec();
            big.resize(3000, b'x');
            let _ = fake.send_to(&big, from).await;
        }
    });
    let upstream = Upstream::builder(addr, FirstByte).build().unwrap();
    let answer = upstream
        .clone()
        .oneshot(Bytes::from_static(b"\x01q"))
        .await
        .unwrap();
    assert_eq!(answer.len(), 3000, "over the old 2 048-byte buffers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_socket_closes_a_timeout_later_even_if_strays_keep_coming() {
    let fake = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let upstream = Upstream::builder(fake.local_addr().unwrap(), FirstByte)
        .sockets(1)
        .rotate_after(1)
        .timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let old = upstream.local_addrs()[0];
    let _ = upstream.clone().oneshot(Bytes::from_static(b"\x01a")).await;
    let _ = upstream.clone().oneshot(Bytes::from_static(b"\x02b")).await; // rotates
    assert_eq!(upstream.stats().rotations, 1);
    // A stray every 50 ms to the retired port.
    let stray = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let target = SocketAddr::from(([127, 0, 0, 1], old.port()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        stray.send_to(b"junk", target).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        if std::net::UdpSocket::bind(target).is_ok() {
            break; // closed: its port is free again
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the retired socket stayed open"
        );
    }
}

#[tokio::test]
async fn an_answer_polled_after_it_finished_gives_its_place_back_once() {
    let (addr, _) = echo_upstream(Duration::ZERO).await;
    let upstream = Upstream::builder(addr, Tagged::new())
        .max_outstanding(1)
        .build()
        .unwrap();
    let mut answer = upstream.try_call(&request(b"once")).expect("a place");
    std::future::poll_fn(|cx| std::pin::Pin::new(&mut answer).poll(cx))
        .await
        .unwrap();
    // Against the contract, polled again: an error, and no second place.
    let again = futures_util::FutureExt::now_or_never(std::future::poll_fn(|cx| {
        std::pin::Pin::new(&mut answer).poll(cx)
    }));
    assert!(
        matches!(again, Some(Err(UpstreamError::Closed))),
        "{again:?}"
    );
    let held = upstream.try_call(&request(b"1")).expect("the one place");
    assert!(
        upstream.try_call(&request(b"2")).is_none(),
        "still one place at most"
    );
    drop(held);
}

#[test]
fn a_client_whose_runtime_shut_down_serves_on_in_another() {
    let (addr, upstream) = {
        let first = tokio::runtime::Runtime::new().unwrap();
        first.block_on(async {
            let (addr, _) = echo_upstream(Duration::ZERO).await;
            let upstream = Upstream::builder(addr, Tagged::new())
                .sockets(2)
                .build()
                .unwrap();
            (addr, upstream)
        })
    };
    // The first runtime is gone, with the sockets' tasks and the fake
    // upstream: the sockets are replaced on this one.
    let second = tokio::runtime::Runtime::new().unwrap();
    second.block_on(async {
        let socket = UdpSocket::bind(addr).await.unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                let _ = socket.send_to(&buf[..n], from).await;
            }
        });
        for i in 0..4u32 {
            let answer = tokio::time::timeout(
                Duration::from_secs(5),
                upstream.clone().oneshot(request(&i.to_be_bytes())),
            )
            .await
            .expect("an answer, not a hang")
            .unwrap();
            assert_eq!(&answer[8..], &i.to_be_bytes());
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_racing_rotation_are_all_answered() {
    let (addr, _) = echo_upstream(Duration::ZERO).await;
    // A fresh socket for every request, from several tasks at once.
    let upstream = Upstream::builder(addr, Tagged::new())
        .sockets(1)
        .rotate_after(1)
        .max_outstanding(16)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut asks = tokio::task::JoinSet::new();
    for task in 0..8u32 {
        let upstream = upstream.clone();
        asks.spawn(async move {
            for i in 0..100u32 {
                let body = (task * 1000 + i).to_be_bytes();
                // A request left on a socket whose task ended would wait
                // forever: bounded here.
                let answer = tokio::time::timeout(
                    Duration::from_secs(10),
                    upstream.clone().oneshot(request(&body)),
                )
                .await
                .expect("an answer, not a hang")
                .unwrap();
                assert_eq!(&answer[8..], &body);
            }
        });
    }
    while let Some(joined) = asks.join_next().await {
        joined.unwrap();
    }
    assert_eq!(upstream.stats().answered, 800);
}

/// A key whose hashing panics for 0xff: a protocol's bug.
#[derive(Clone, PartialEq, Eq)]
struct Fragile(u8);

impl std::hash::Hash for Fragile {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        assert!(self.0 != 0xff, "a key that cannot be hashed");
        self.0.hash(state);
    }
}

struct FragileKeys;

impl Correlate for FragileKeys {
    type Key = Fragile;

    fn prepare(&self, request: &mut BytesMut) -> Option<Fragile> {
        request.first().copied().map(Fragile)
    }

    fn key(&self, answer: &[u8]) -> Option<Fragile> {
        answer.first().copied().map(Fragile)
    }
}

#[tokio::test]
async fn a_panic_hashing_a_key_gives_the_place_back() {
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let upstream = Upstream::builder(silent.local_addr().unwrap(), FragileKeys)
        .max_outstanding(1)
        .timeout(Duration::from_millis(50))
        .build()
        .unwrap();
    let panicked =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| upstream.try_call(b"\xff")));
    assert!(panicked.is_err());
    assert!(
        upstream.try_call(b"\x01").is_some(),
        "the one place was given back"
    );
}
