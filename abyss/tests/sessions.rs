//! Per-peer sessions, driven through their service with tokio's clock
//! paused, and once through a real server.

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use abyss::middleware::{DropReason, drop_reason};
use abyss::session::{Session, SessionContext, SessionService, Sessions, Step};
use abyss::{BoxError, Request, SendHandle, Server};
use bytes::Bytes;
use futures_util::FutureExt;
use tower::{Service, ServiceExt};

/// Everything the sessions' hooks did, in order.
type Log = Arc<Mutex<Vec<String>>>;

/// A counter per peer, driven by commands in the payload.
struct Probe {
    peer: SocketAddr,
    count: u64,
    log: Log,
    alive: Arc<AtomicUsize>,
}

impl Probe {
    fn note(&self, what: &str) {
        self.log
            .lock()
            .unwrap()
            .push(format!("{} {what}", self.peer.port()));
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.alive.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Session for Probe {
    async fn handle(&mut self, request: Request) -> Step {
        self.count += 1;
        let step = match request.payload().as_ref() {
            b"close" => Step::close(),
            b"fail" => Step::error("asked to fail"),
            b"panic" => panic!("asked to panic"),
            b"persist 10s" => Step::keep_with_idle_timeout(Duration::from_secs(10)),
            b"once 5s" => Step::keep_for(Duration::from_secs(5)),
            b"slow" => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                Step::keep()
            }
            _ => Step::keep(),
        };
        step.reply(self.count.to_string())
    }

    async fn on_idle(&mut self, _context: &SessionContext) -> Step {
        self.note("idle");
        Step::close()
    }

    async fn on_close(&mut self, context: &SessionContext) {
        assert_eq!(context.peer(), self.peer);
        self.note("close");
    }

    async fn on_error(&mut self, error: &BoxError, _context: &SessionContext) {
        self.note(&format!("error: {error}"));
    }

    async fn on_shutdown(&mut self, _context: &SessionContext) {
        self.note("shutdown");
    }

    async fn on_evict(&mut self, _context: &SessionContext) {
        self.note("evict");
    }
}

struct Harness {
    sessions: Sessions<Probe>,
    service: SessionService<Probe, SocketAddr>,
    log: Log,
    alive: Arc<AtomicUsize>,
}

fn harness(
    configure: impl FnOnce(
        abyss::session::SessionsBuilder<Probe>,
    ) -> abyss::session::SessionsBuilder<Probe>,
) -> Harness {
    let log = Log::default();
    let alive = Arc::new(AtomicUsize::new(0));
    let sessions = configure(Sessions::builder({
        let (log, alive) = (log.clone(), alive.clone());
        move |peer| {
            alive.fetch_add(1, Ordering::SeqCst);
            Probe {
                peer,
                count: 0,
                log: log.clone(),
                alive: alive.clone(),
            }
        }
    }))
    .build()
    .unwrap();
    Harness {
        service: sessions.service(),
        sessions,
        log,
        alive,
    }
}

fn request(port: u16, payload: &'static [u8]) -> Request {
    Request::new(
        SocketAddr::from(([192, 0, 2, 1], port)),
        "192.0.2.53:53".parse().unwrap(),
        Bytes::from_static(payload),
        SendHandle::detached(),
    )
}

impl Harness {
    async fn send(&mut self, port: u16, payload: &'static [u8]) -> Result<Option<Bytes>, BoxError> {
        self.service
            .ready()
            .await
            .unwrap()
            .call(request(port, payload))
            .await
    }

    async fn reply(&mut self, port: u16, payload: &'static [u8]) -> String {
        let reply = self.send(port, payload).await.unwrap().expect("a reply");
        String::from_utf8(reply.to_vec()).unwrap()
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

/// Lets every task run until all wait (the clock is paused, so time moves
/// only when nothing else can).
async fn settle() {
    tokio::time::sleep(Duration::from_millis(1)).await;
}

#[tokio::test(start_paused = true)]
async fn state_survives_across_a_peers_datagrams_and_is_separate_per_peer() {
    let mut h = harness(|b| b);
    assert_eq!(h.reply(1000, b"a").await, "1");
    assert_eq!(h.reply(1000, b"b").await, "2");
    assert_eq!(
        h.reply(2000, b"a").await,
        "1",
        "another peer has its own state"
    );
    assert_eq!(h.reply(1000, b"c").await, "3");
    let stats = h.sessions.stats();
    assert_eq!((stats.live, stats.created), (2, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peers_datagrams_are_handled_in_order_while_peers_run_concurrently() {
    let seen: Arc<Mutex<Vec<(u16, u32)>>> = Arc::default();
    struct Recorder(Arc<Mutex<Vec<(u16, u32)>>>);
    impl Session for Recorder {
        async fn handle(&mut self, request: Request) -> Step {
            let n = u32::from_be_bytes(request.payload()[..4].try_into().unwrap());
            // Give other peers' sessions every chance to interleave.
            for _ in 0..(n % 3) {
                tokio::task::yield_now().await;
            }
            self.0.lock().unwrap().push((request.peer().port(), n));
            Step::keep()
        }
    }
    let sessions = Sessions::builder({
        let seen = seen.clone();
        move |_| Recorder(seen.clone())
    })
    .queue_size(1000)
    .build()
    .unwrap();
    let mut service = sessions.service();
    let mut pending = Vec::new();
    for n in 0..500u32 {
        for port in [1u16, 2, 3] {
            let request = Request::new(
                SocketAddr::from(([192, 0, 2, 1], port)),
                "192.0.2.53:53".parse().unwrap(),
                Bytes::copy_from_slice(&n.to_be_bytes()),
                SendHandle::detached(),
            );
            pending.push(service.ready().await.unwrap().call(request));
        }
    }
    for result in futures_util::future::join_all(pending).await {
        result.unwrap();
    }
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1500);
    for port in [1u16, 2, 3] {
        let order: Vec<u32> = seen
            .iter()
            .filter(|(p, _)| *p == port)
            .map(|(_, n)| *n)
            .collect();
        assert_eq!(
            order,
            (0..500).collect::<Vec<_>>(),
            "peer {port} out of order"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn the_idle_timeout_fires_the_hook_and_a_later_datagram_starts_afresh() {
    let mut h = harness(|b| b.idle_timeout(Duration::from_secs(60)));
    assert_eq!(h.reply(1000, b"a").await, "1");
    assert_eq!(h.reply(1000, b"b").await, "2");
    tokio::time::sleep(Duration::from_secs(59)).await;
    assert_eq!(h.sessions.stats().live, 1, "not idle yet");
    tokio::time::sleep(Duration::from_secs(2)).await;
    settle().await;
    assert_eq!(h.log(), ["1000 idle", "1000 close"]);
    assert_eq!(h.sessions.stats().live, 0);
    assert_eq!(h.alive.load(Ordering::SeqCst), 0, "the state was dropped");
    assert_eq!(h.reply(1000, b"again").await, "1", "a fresh session");
    let stats = h.sessions.stats();
    assert_eq!((stats.created, stats.timed_out, stats.closed), (2, 1, 1));
}

#[tokio::test(start_paused = true)]
async fn a_persistent_idle_timeout_holds_and_a_one_shot_one_applies_once() {
    let mut h = harness(|b| b.idle_timeout(Duration::from_secs(60)));
    h.reply(1000, b"persist 10s").await;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(9)).await;
        h.reply(1000, b"still here").await;
    }
    assert_eq!(
        h.sessions.stats().created,
        1,
        "9 s pauses stay under the 10 s timeout"
    );
    tokio::time::sleep(Duration::from_secs(11)).await;
    settle().await;
    assert_eq!(h.log(), ["1000 idle", "1000 close"], "10 s, not 60 s");

    h.reply(2000, b"once 5s").await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    h.reply(2000, b"plain").await;
    // The one-shot timeout is used up: the default 60 s applies again.
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(h.sessions.stats().live, 1);
    tokio::time::sleep(Duration::from_secs(31)).await;
    settle().await;
    assert_eq!(h.sessions.stats().live, 0);
}

#[tokio::test(start_paused = true)]
async fn close_ends_the_session_after_replying() {
    let mut h = harness(|b| b);
    h.reply(1000, b"a").await;
    assert_eq!(
        h.reply(1000, b"close").await,
        "2",
        "the closing step still replies"
    );
    settle().await;
    assert_eq!(h.log(), ["1000 close"]);
    assert_eq!(
        (h.sessions.stats().live, h.alive.load(Ordering::SeqCst)),
        (0, 0)
    );
    assert_eq!(h.reply(1000, b"b").await, "1");
}

#[tokio::test(start_paused = true)]
async fn an_error_calls_the_error_hook_ends_the_session_and_fails_the_datagram() {
    let mut h = harness(|b| b);
    h.reply(1000, b"a").await;
    let error = h.send(1000, b"fail").await.unwrap_err();
    assert_eq!(error.to_string(), "asked to fail");
    assert_eq!(
        drop_reason(&*error),
        None,
        "a handler error, not a drop decision"
    );
    settle().await;
    assert_eq!(h.log(), ["1000 error: asked to fail"]);
    let stats = h.sessions.stats();
    assert_eq!((stats.live, stats.failed), (0, 1));
}

#[tokio::test(start_paused = true)]
async fn a_panic_in_a_session_reaches_the_caller_and_ends_only_that_session() {
    let mut h = harness(|b| b);
    h.reply(1000, b"a").await;
    h.reply(2000, b"a").await;
    let call = h
        .service
        .ready()
        .await
        .unwrap()
        .call(request(1000, b"panic"));
    assert!(
        AssertUnwindSafe(call).catch_unwind().await.is_err(),
        "resumed for the server to count"
    );
    settle().await;
    let stats = h.sessions.stats();
    assert_eq!((stats.live, stats.panicked), (1, 1));
    assert_eq!(
        h.reply(2000, b"b").await,
        "2",
        "the other peer is untouched"
    );
    assert_eq!(h.reply(1000, b"b").await, "1");
}

#[tokio::test(start_paused = true)]
async fn ten_thousand_peers_against_a_cap_of_a_thousand_keep_at_most_a_thousand_sessions() {
    // One source here, so its share must be the whole table.
    let mut h = harness(|b| b.max_sessions(1_000).max_sessions_per_source(1_000));
    let mut refused = 0;
    for port in 1..=10_000u16 {
        match h.send(port, b"hello").await {
            Ok(_) => {}
            Err(error) => {
                assert_eq!(drop_reason(&*error), Some(DropReason::Overloaded));
                refused += 1;
            }
        }
        if port % 1_000 == 0 {
            assert!(h.sessions.stats().live <= 1_000);
        }
    }
    let stats = h.sessions.stats();
    assert_eq!(
        (stats.live, stats.created, stats.refused),
        (1_000, 1_000, 9_000)
    );
    assert_eq!(refused, 9_000);
    assert_eq!(h.alive.load(Ordering::SeqCst), 1_000);
}

#[tokio::test(start_paused = true)]
async fn a_full_session_queue_drops_and_counts_the_datagram() {
    let mut h = harness(|b| b.queue_size(2));
    let mut calls = Vec::new();
    calls.push(
        h.service
            .ready()
            .await
            .unwrap()
            .call(request(1000, b"slow")),
    );
    // Let the session take the first one off its queue.
    tokio::task::yield_now().await;
    for _ in 0..3 {
        calls.push(
            h.service
                .ready()
                .await
                .unwrap()
                .call(request(1000, b"slow")),
        );
    }
    // The first is being handled, two wait in the queue, the fourth is over.
    let results = futures_util::future::join_all(calls).await;
    let dropped: Vec<bool> = results.iter().map(Result::is_err).collect();
    assert_eq!(dropped, [false, false, false, true]);
    assert_eq!(h.sessions.stats().queue_full, 1);
}

#[tokio::test(start_paused = true)]
async fn shutdown_calls_every_live_sessions_hook_after_its_queue() {
    let mut h = harness(|b| b);
    for port in 1..=50u16 {
        h.reply(port, b"hello").await;
    }
    let slow = h.service.ready().await.unwrap().call(request(7, b"slow"));
    h.sessions.shutdown().await;
    assert_eq!(
        slow.await.unwrap().as_deref(),
        Some(&b"2"[..]),
        "queued work finished first"
    );
    let log = h.log();
    assert_eq!(log.len(), 50);
    assert!(log.iter().all(|line| line.ends_with("shutdown")));
    let stats = h.sessions.stats();
    assert_eq!((stats.live, stats.shut_down), (0, 50));
    assert_eq!(h.alive.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn a_shutdown_future_outlives_the_handle_it_came_from() {
    let mut h = harness(|b| b);
    h.reply(1, b"hello").await;
    let shutdown = {
        let sessions = h.sessions.clone();
        let future = sessions.shutdown();
        drop(sessions);
        // Spawnable: owned, Send and 'static.
        tokio::spawn(future)
    };
    tokio::time::timeout(Duration::from_secs(5), shutdown)
        .await
        .expect("every session ended within the patience")
        .unwrap();
    assert_eq!(h.sessions.stats().shut_down, 1);
}

#[tokio::test]
async fn a_graceful_server_shutdown_ends_every_session_through_its_hook() {
    let h = harness(|b| b);
    let handle = Server::bind("127.0.0.1:0")
        .listeners(1)
        .on_shutdown({
            let sessions = h.sessions.clone();
            move || sessions.shutdown()
        })
        .serve(h.service.clone())
        .await
        .unwrap();
    let timeout = Duration::from_secs(10);
    let mut clients = Vec::new();
    for _ in 0..5 {
        let client = abyss::client::UdpClient::connect(handle.local_addr())
            .await
            .unwrap();
        assert_eq!(client.request(b"x", timeout).await.unwrap(), "1");
        assert_eq!(client.request(b"y", timeout).await.unwrap(), "2");
        clients.push(client);
    }
    assert_eq!(h.sessions.stats().live, 5);
    handle.shutdown().await;
    assert_eq!(h.sessions.stats().shut_down, 5);
    assert_eq!(
        h.log().iter().filter(|l| l.ends_with("shutdown")).count(),
        5
    );
}

#[tokio::test]
async fn invalid_session_options_are_named() {
    let factory = |_: SocketAddr| Counter;
    struct Counter;
    impl Session for Counter {
        async fn handle(&mut self, _request: Request) -> Step {
            Step::keep()
        }
    }
    assert_eq!(
        Sessions::builder(factory)
            .max_sessions(0)
            .build()
            .unwrap_err()
            .field(),
        Some("max_sessions")
    );
    assert_eq!(
        Sessions::builder(factory)
            .queue_size(0)
            .build()
            .unwrap_err()
            .field(),
        Some("queue_size")
    );
    assert_eq!(
        Sessions::builder(factory)
            .idle_timeout(Duration::ZERO)
            .build()
            .unwrap_err()
            .field(),
        Some("idle_timeout")
    );
}

#[tokio::test(start_paused = true)]
async fn one_host_sending_from_thousands_of_ports_cannot_lock_new_peers_out() {
    let mut h = harness(|b| b.max_sessions(1_000));
    // One host takes as many sessions as it can: its share, a sixteenth.
    let mut taken = 0;
    for port in 1..=5_000u16 {
        if h.send(port, b"hello").await.is_ok() {
            taken += 1;
        }
    }
    assert_eq!(taken, 1_000 / 16);
    let stats = h.sessions.stats();
    assert_eq!(
        (stats.live, stats.refused_per_source),
        (62, 5_000 - 62),
        "{stats:?}"
    );
    // Another host is still served at once.
    let other = Request::new(
        SocketAddr::from(([198, 51, 100, 7], 4242)),
        "192.0.2.53:53".parse().unwrap(),
        Bytes::from_static(b"hello"),
        SendHandle::detached(),
    );
    let reply = h.service.ready().await.unwrap().call(other).await.unwrap();
    assert_eq!(reply.as_deref(), Some(&b"1"[..]));
    // And the host's sessions count by its IPv6 /64 as one source too.
    let v6 = |low: u16, port: u16| {
        Request::new(
            SocketAddr::new(format!("2001:db8::{low:x}").parse().unwrap(), port),
            "[2001:db8::53]:53".parse().unwrap(),
            Bytes::from_static(b"hello"),
            SendHandle::detached(),
        )
    };
    let mut v6_taken = 0;
    for low in 1..=200u16 {
        if h.service
            .ready()
            .await
            .unwrap()
            .call(v6(low, 4000))
            .await
            .is_ok()
        {
            v6_taken += 1;
        }
    }
    assert_eq!(v6_taken, 62, "addresses of one /64 share one share");
}

#[test]
fn a_share_of_zero_sessions_per_source_is_refused_with_the_option_named() {
    let error = Sessions::builder(|peer| Probe {
        peer,
        count: 0,
        log: Log::default(),
        alive: Arc::default(),
    })
    .max_sessions_per_source(0)
    .build()
    .unwrap_err();
    assert_eq!(error.field(), Some("max_sessions_per_source"));
}

fn request_from(ip: [u8; 4], port: u16, payload: &'static [u8]) -> Request {
    Request::new(
        SocketAddr::from((ip, port)),
        "192.0.2.53:53".parse().unwrap(),
        Bytes::from_static(payload),
        SendHandle::detached(),
    )
}

impl Harness {
    async fn send_from(
        &mut self,
        ip: [u8; 4],
        port: u16,
        payload: &'static [u8],
    ) -> Result<Option<Bytes>, BoxError> {
        let request = request_from(ip, port, payload);
        self.service.ready().await.unwrap().call(request).await
    }
}

const HEAVY: [u8; 4] = [192, 0, 2, 1];
const LIGHT: [u8; 4] = [198, 51, 100, 2];
const NEWCOMER: [u8; 4] = [203, 0, 113, 3];

#[tokio::test(start_paused = true)]
async fn a_full_table_evicts_the_least_recently_active_session_of_the_heaviest_source() {
    let mut h = harness(|b| b.max_sessions(10).max_sessions_per_source(8));
    // The heavy source takes 8 places, one a second; the light one 2.
    for port in 1..=8 {
        h.send_from(HEAVY, port, b"hi").await.unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    h.send_from(LIGHT, 1, b"hi").await.unwrap();
    h.send_from(LIGHT, 2, b"hi").await.unwrap();
    // Port 1 speaks again: port 2 is now the heavy source's quietest.
    tokio::time::advance(Duration::from_secs(1)).await;
    h.send_from(HEAVY, 1, b"hi").await.unwrap();
    assert_eq!(h.sessions.stats().live, 10);

    // A newcomer takes port 2's place, and is served at once.
    let reply = h.send_from(NEWCOMER, 9, b"hi").await.unwrap();
    assert_eq!(reply.as_deref(), Some(&b"1"[..]));
    settle().await;
    let stats = h.sessions.stats();
    assert_eq!(
        (stats.live, stats.evicted, stats.refused),
        (10, 1, 0),
        "{stats:?}"
    );
    assert_eq!(h.log(), ["2 evict"]);
    assert_eq!(h.alive.load(Ordering::SeqCst), 10);

    // The heaviest source cannot take a place back from itself (shares
    // would get no more even): its returning peer is refused.
    assert!(h.send_from(HEAVY, 2, b"hi").await.is_err());
    // The light source may take places from the heavy one while that holds
    // at least two more than it: 7 against 2, then 6 against 3.
    for port in 3..=4 {
        h.send_from(LIGHT, port, b"hi").await.unwrap();
    }
    let stats = h.sessions.stats();
    assert_eq!((stats.live, stats.evicted), (10, 3), "{stats:?}");
    // 5 against 4 evicts no more.
    assert!(h.send_from(LIGHT, 5, b"hi").await.is_err());
    assert_eq!(h.sessions.stats().refused, 2);
    settle().await;
    assert_eq!(
        h.log(),
        ["2 evict", "3 evict", "4 evict"],
        "the quietest first"
    );
    // Port 1, the most recently active, kept its session and its count.
    assert_eq!(
        h.send_from(HEAVY, 1, b"hi").await.unwrap().as_deref(),
        Some(&b"3"[..])
    );
}

#[tokio::test(start_paused = true)]
async fn a_table_full_of_single_session_sources_refuses_rather_than_churns() {
    let mut h = harness(|b| b.max_sessions(4));
    for last in 1..=4u8 {
        h.send_from([192, 0, 2, last], 1000, b"hi").await.unwrap();
    }
    for last in 5..=50u8 {
        assert!(h.send_from([192, 0, 2, last], 1000, b"hi").await.is_err());
    }
    let stats = h.sessions.stats();
    assert_eq!(
        (stats.live, stats.evicted, stats.refused),
        (4, 0, 46),
        "{stats:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_evicted_session_answers_what_it_had_queued_before_it_ends() {
    let mut h = harness(|b| b.max_sessions(3).max_sessions_per_source(3));
    // Port 1 is busy for a second, with a second datagram queued.
    let slow = h
        .service
        .ready()
        .await
        .unwrap()
        .call(request_from(HEAVY, 1, b"slow"));
    let queued = h
        .service
        .ready()
        .await
        .unwrap()
        .call(request_from(HEAVY, 1, b"hi"));
    // Ports 2 and 3 are busy too: with every session of the source
    // handling a datagram, the newcomer evicts one of them anyway (port 1,
    // the first it compares).
    let others: Vec<_> = [2, 3]
        .map(|port| {
            h.service
                .ready()
                .now_or_never()
                .unwrap()
                .unwrap()
                .call(request_from(HEAVY, port, b"slow"))
        })
        .into_iter()
        .collect();
    tokio::time::advance(Duration::from_millis(10)).await;
    assert_eq!(
        h.send_from(NEWCOMER, 1, b"hi").await.unwrap().as_deref(),
        Some(&b"1"[..])
    );
    assert_eq!(h.sessions.stats().evicted, 1);
    assert!(h.log().is_empty(), "it still has work");
    assert_eq!(slow.await.unwrap().as_deref(), Some(&b"1"[..]));
    assert_eq!(queued.await.unwrap().as_deref(), Some(&b"2"[..]));
    for other in others {
        assert_eq!(other.await.unwrap().as_deref(), Some(&b"1"[..]));
    }
    settle().await;
    assert_eq!(h.log(), ["1 evict"]);
    let stats = h.sessions.stats();
    assert_eq!((stats.live, stats.created), (3, 4), "{stats:?}");
    assert_eq!(h.alive.load(Ordering::SeqCst), 3);
    h.sessions.shutdown().await;
    assert_eq!(h.alive.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn a_panicking_factory_fails_that_datagram_and_the_table_stays_whole() {
    let sessions = Sessions::builder(|peer: SocketAddr| {
        assert_ne!(peer.port(), 13, "unlucky peer");
        Probe {
            peer,
            count: 0,
            log: Log::default(),
            alive: Arc::new(AtomicUsize::new(1)),
        }
    })
    .build()
    .unwrap();
    let mut service = sessions.service();
    let unlucky = service.ready().await.unwrap().call(request(13, b"hi"));
    let panicked = AssertUnwindSafe(unlucky).catch_unwind().await;
    assert!(panicked.is_err(), "the panic reaches the caller");
    let reply = service
        .ready()
        .await
        .unwrap()
        .call(request(14, b"hi"))
        .await;
    assert_eq!(reply.unwrap().as_deref(), Some(&b"1"[..]));
    let stats = sessions.stats();
    assert_eq!(
        (stats.live, stats.panicked, stats.created),
        (1, 1, 2),
        "{stats:?}"
    );
    tokio::time::timeout(Duration::from_secs(10), sessions.shutdown())
        .await
        .expect("shutdown ends: the panicked session is not waited for");
}

/// Blocks forever on `block`, answers anything else.
struct Stuck;

impl Session for Stuck {
    async fn handle(&mut self, request: Request) -> Step {
        if request.payload().as_ref() == b"block" {
            std::future::pending::<()>().await;
        }
        Step::keep().reply("ok")
    }
}

#[test]
fn a_session_dropped_with_its_runtime_gives_back_its_place_and_answers_its_queue() {
    let sessions = Sessions::builder(|_peer| Stuck)
        .max_sessions(1)
        .build()
        .unwrap();
    let mut service = sessions.service();
    let first = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // The session blocks on its first datagram; a second waits in its queue.
    let mut queued = None;
    first.block_on(async {
        let _blocked = service.call(request(1, b"block"));
        tokio::task::yield_now().await;
        queued = Some(service.call(request(1, b"queued")));
        tokio::task::yield_now().await;
    });
    let queued = queued.expect("queued above");
    drop(first); // the session's task goes with its runtime
    let second = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    second.block_on(async {
        let answered = tokio::time::timeout(Duration::from_secs(5), queued)
            .await
            .expect("the queued datagram is answered, not left waiting");
        let error = answered.unwrap_err();
        assert_eq!(drop_reason(&*error), Some(DropReason::Overloaded));
        assert_eq!(sessions.stats().live, 0, "its place is given back");
        let other = Request::new(
            SocketAddr::from(([198, 51, 100, 2], 1)),
            "192.0.2.53:53".parse().unwrap(),
            Bytes::from_static(b"hi"),
            SendHandle::detached(),
        );
        let reply = service.ready().await.unwrap().call(other).await.unwrap();
        assert_eq!(
            reply.as_deref(),
            Some(&b"ok"[..]),
            "another peer gets the place"
        );
    });
}

#[tokio::test(start_paused = true)]
async fn a_session_busy_with_a_datagram_is_not_taken_for_an_idle_one() {
    let mut h = harness(|b| b.max_sessions(3).max_sessions_per_source(3));
    // Port 3 spoke first, ports 1 and 2 later...
    for port in [3, 1, 2] {
        h.send_from(HEAVY, port, b"hi").await.unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    // ...and port 3 is now handling a long datagram.
    let busy = h
        .service
        .ready()
        .await
        .unwrap()
        .call(request_from(HEAVY, 3, b"slow"));
    tokio::time::advance(Duration::from_millis(10)).await;
    h.send_from(NEWCOMER, 9, b"hi").await.unwrap();
    settle().await;
    assert_eq!(
        h.log(),
        ["1 evict"],
        "the quietest idle session, not the busy one"
    );
    assert_eq!(busy.await.unwrap().as_deref(), Some(&b"2"[..]));
}
