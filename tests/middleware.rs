//! Middleware on a real server: the builder's options, tower's own layers,
//! and the equivalence of the two.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use abyss::middleware::{PeerRateLimiter, RateQuota, SizeLimitLayer};
use abyss::{BoxError, Request, Server, ServerHandle, Stats};
use abyss_tests::{
    PATIENCE, ask, assert_accounted, client, client_on, echo, recv_within, settled, wait_for_stats,
};
use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tower::ServiceBuilder;
use tower::util::BoxCloneService;

/// Long enough that a request held on purpose cannot time out before the
/// test has sent what it sends next, however loaded the machine.
const TIMEOUT: Duration = Duration::from_secs(3);

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Sends `count` datagrams, waits until the server has finished all it
/// received, and returns how many replies came back.
async fn burst(handle: &ServerHandle, socket: &UdpSocket, count: usize) -> usize {
    let before = handle.stats();
    for i in 0..count {
        socket
            .send_to(&(i as u32).to_be_bytes(), handle.local_addr())
            .await
            .unwrap();
    }
    let after = wait_for_stats(handle, "the burst to be handled", |s| {
        s.received >= before.received + count as u64 && s.in_flight == 0
    })
    .await;
    let replied = (after.replied - before.replied) as usize;
    for n in 0..replied {
        recv_within(socket, PATIENCE)
            .await
            .unwrap_or_else(|| panic!("reply {n} of {replied} missing"));
    }
    replied
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_over_its_rate_limit_is_cut_off_while_another_is_still_answered() {
    let handle = Server::bind("0.0.0.0:0")
        .listeners(2)
        .rate_limit(RateQuota::new(1, Duration::from_secs(600)).with_burst(10))
        .serve(echo())
        .await
        .unwrap();
    let port = handle.local_addr().port();
    let server: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let noisy = client_on("127.0.0.2").await;
    let quiet = client_on("127.0.0.3").await;

    for i in 0..100u32 {
        noisy.send_to(&i.to_be_bytes(), server).await.unwrap();
    }
    let stats = wait_for_stats(&handle, "100 datagrams handled", |s| {
        s.received == 100 && s.in_flight == 0
    })
    .await;
    // The burst of 10; the next allowance comes only after 10 minutes, so
    // however slowly the 100 were sent, no more get through.
    assert_eq!(stats.replied, 10, "{stats:?}");
    assert_eq!(stats.replied + stats.dropped.rate_limited, 100);

    assert_eq!(ask(&quiet, server, b"me too?").await, b"me too?");
    let limiter = handle.rate_limiter().expect("the option's limiter");
    let rl = limiter.stats();
    assert_eq!(rl.tracked_peers, 2);
    assert_eq!(rl.limited, stats.dropped.rate_limited);
    assert_accounted(&handle.stats());
    handle.shutdown().await;
}

#[tokio::test]
async fn the_rate_limit_can_be_raised_while_serving() {
    let handle = Server::bind(loopback())
        .listeners(1)
        .rate_limit(RateQuota::new(1, Duration::from_secs(600)))
        .serve(echo())
        .await
        .unwrap();
    let socket = client().await;
    assert_eq!(burst(&handle, &socket, 5).await, 1);
    handle
        .rate_limiter()
        .unwrap()
        .set_quota(RateQuota::per_second(1000))
        .unwrap();
    assert_eq!(burst(&handle, &socket, 5).await, 5);
    handle.shutdown().await;
}

#[tokio::test]
async fn a_datagram_one_byte_over_the_packet_size_is_dropped_and_the_limit_itself_answered() {
    let handle = Server::bind(loopback())
        .listeners(1)
        .max_packet_size(512)
        .serve(echo())
        .await
        .unwrap();
    let socket = client().await;
    socket
        .send_to(&[1u8; 513], handle.local_addr())
        .await
        .unwrap();
    wait_for_stats(&handle, "the 513-byte datagram dropped", |s| {
        s.dropped.too_large == 1
    })
    .await;
    assert_eq!(
        ask(&socket, handle.local_addr(), &[2u8; 512]).await,
        vec![2u8; 512]
    );
    let stats = settled(&handle).await;
    assert_eq!(
        (stats.received, stats.replied, stats.dropped.too_large),
        (2, 1, 1)
    );
    handle.shutdown().await;
}

#[tokio::test]
async fn the_default_packet_size_limit_is_the_originals_8192() {
    let handle = Server::bind(loopback())
        .listeners(1)
        .serve(echo())
        .await
        .unwrap();
    let socket = client().await;
    socket
        .send_to(&[0u8; 8193], handle.local_addr())
        .await
        .unwrap();
    wait_for_stats(&handle, "8193 bytes dropped", |s| s.dropped.too_large == 1).await;
    assert_eq!(
        ask(&socket, handle.local_addr(), &[0u8; 8192]).await.len(),
        8192
    );
    handle.shutdown().await;
}

/// A handler that reports each start, sleeps a minute for `slow`, and echoes.
fn reporting(
    started: mpsc::UnboundedSender<()>,
) -> impl Fn(Request) -> std::pin::Pin<Box<dyn Future<Output = Result<Bytes, Infallible>> + Send>>
+ Clone
+ Send
+ 'static {
    move |request: Request| {
        let started = started.clone();
        Box::pin(async move {
            let _ = started.send(());
            if request.payload().as_ref() == b"slow" {
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
            Ok(request.into_payload())
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn towers_own_middleware_wraps_a_handler_served_by_abyss() {
    let (started_tx, mut started) = mpsc::unbounded_channel();
    // Buffer, then LoadShed over ConcurrencyShed (drop when two are in
    // flight), then Timeout, all boxed into one cloneable service.
    let stack = ServiceBuilder::new()
        .buffer(64)
        .load_shed()
        .concurrency_limit(2)
        .timeout(TIMEOUT)
        .service_fn(reporting(started_tx));
    let service: BoxCloneService<Request, Bytes, BoxError> = BoxCloneService::new(stack);

    let handle = Server::bind(loopback())
        .listeners(1)
        .serve(service)
        .await
        .unwrap();
    let server = handle.local_addr();
    let socket = client().await;
    assert_eq!(ask(&socket, server, b"fast").await, b"fast");
    started.recv().await.unwrap();

    socket.send_to(b"slow", server).await.unwrap();
    socket.send_to(b"slow", server).await.unwrap();
    for _ in 0..2 {
        tokio::time::timeout(PATIENCE, started.recv())
            .await
            .unwrap()
            .unwrap();
    }
    // Both slots are taken: LoadShed refuses instead of queueing.
    socket.send_to(b"shed me", server).await.unwrap();
    let stats = wait_for_stats(&handle, "one overloaded", |s| s.dropped.overloaded == 1).await;
    assert_eq!(stats.dropped.handler_error, 0, "{stats:?}");
    // Then the two slow ones time out, and the slots are free again.
    wait_for_stats(&handle, "two timed out", |s| s.dropped.timed_out == 2).await;
    assert_eq!(ask(&socket, server, b"fast again").await, b"fast again");
    let stats = settled(&handle).await;
    assert_eq!((stats.replied, stats.dropped.total()), (2, 3));
    assert_accounted(&stats);
    handle.shutdown().await;
}

/// Runs the same traffic against a server and returns its counters.
async fn scenario(handle: ServerHandle) -> Stats {
    let socket = client().await;
    let server = handle.local_addr();
    socket.send_to(&[0u8; 300], server).await.unwrap();
    wait_for_stats(&handle, "the oversized datagram", |s| {
        s.received == 1 && s.in_flight == 0
    })
    .await;
    burst(&handle, &socket, 20).await;
    let stats = handle.stats();
    handle.shutdown().await;
    stats
}

#[tokio::test]
async fn the_builder_options_behave_exactly_like_the_layers_stacked_by_hand() {
    let quota = RateQuota::new(1, Duration::from_secs(600)).with_burst(5);
    let with_options = Server::bind(loopback())
        .listeners(1)
        .max_packet_size(256)
        .rate_limit(quota)
        .serve(echo())
        .await
        .unwrap();
    let by_options = scenario(with_options).await;

    let limiter = PeerRateLimiter::new(quota).unwrap();
    let stacked = ServiceBuilder::new()
        .layer(SizeLimitLayer::new(256))
        .layer(limiter.layer())
        .service(echo());
    let by_hand = Server::bind(loopback())
        .listeners(1)
        .without_packet_size_limit()
        .serve(stacked)
        .await
        .unwrap();
    let by_hand = scenario(by_hand).await;

    assert_eq!(by_options, by_hand);
    assert_eq!(by_hand.dropped.too_large, 1);
    assert_eq!(by_hand.replied, 5);
    assert_eq!(by_hand.dropped.rate_limited, 15);
}

#[tokio::test]
async fn invalid_middleware_options_are_named() {
    let cases = [
        (
            Server::bind(loopback()).max_packet_size(0),
            "max_packet_size",
        ),
        (
            Server::bind(loopback()).concurrency_shed(0),
            "concurrency_shed",
        ),
        (Server::bind(loopback()).timeout(Duration::ZERO), "timeout"),
        (
            Server::bind(loopback()).rate_limit(RateQuota::per_second(0)),
            "rate_limit",
        ),
    ];
    for (builder, field) in cases {
        let error = builder.build().unwrap_err();
        assert_eq!(error.field(), Some(field), "{error}");
    }
}

#[test]
fn an_invalid_rate_limit_names_the_part_of_the_quota_at_fault() {
    let cases = [
        (
            RateQuota::per_second(0),
            "rate_limit.max: must be at least 1",
        ),
        (
            RateQuota::per_second(10).with_burst(0),
            "rate_limit.burst: must be at least 1",
        ),
        (
            RateQuota::new(10, Duration::ZERO),
            "rate_limit.window: must be at least 1 ns per datagram",
        ),
    ];
    for (quota, expected) in cases {
        let error = Server::bind(loopback())
            .rate_limit(quota)
            .build()
            .unwrap_err();
        assert_eq!(error.field(), Some("rate_limit"));
        match &error {
            abyss::Error::Config { reason, .. } => assert_eq!(reason, expected),
            other => panic!("not a configuration error: {other:?}"),
        }
        assert!(error.to_string().ends_with(expected), "{error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_concurrency_shed_option_sheds_instead_of_queueing() {
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let handle = Server::bind(loopback())
        .listeners(1)
        .concurrency_shed(1)
        .timeout(TIMEOUT)
        .serve(tower::service_fn(reporting(started_tx)))
        .await
        .unwrap();
    let socket = client().await;
    socket.send_to(b"slow", handle.local_addr()).await.unwrap();
    tokio::time::timeout(PATIENCE, started.recv())
        .await
        .unwrap()
        .unwrap();
    socket.send_to(b"shed", handle.local_addr()).await.unwrap();
    wait_for_stats(&handle, "shed", |s| s.dropped.overloaded == 1).await;
    wait_for_stats(&handle, "timed out", |s| s.dropped.timed_out == 1).await;
    assert_eq!(ask(&socket, handle.local_addr(), b"ok").await, b"ok");
    handle.shutdown().await;
}

#[tokio::test]
async fn the_server_counts_denied_peers_and_amplified_replies_under_their_reasons() {
    use abyss::middleware::{AmplificationGuardLayer, IpFilterLayer};
    // Answers ten times the request: too much for anyone not validated.
    let amplifier = tower::service_fn(|request: Request| async move {
        Ok::<_, Infallible>(Some(Bytes::from(request.payload().repeat(10))))
    });
    let stack = ServiceBuilder::new()
        .layer(IpFilterLayer::new().deny("127.0.0.3/32".parse().unwrap()))
        .layer(
            AmplificationGuardLayer::new(3)
                .validated_by(|peer: SocketAddr| peer.ip().to_string() == "127.0.0.2"),
        )
        .service(amplifier);
    let handle = Server::bind("0.0.0.0:0")
        .listeners(1)
        .serve(stack)
        .await
        .unwrap();
    let server: SocketAddr = format!("127.0.0.1:{}", handle.local_addr().port())
        .parse()
        .unwrap();
    let validated = client_on("127.0.0.2").await;
    assert_eq!(
        ask(&validated, server, b"ab").await,
        b"abababababababababab"
    );
    for ip in ["127.0.0.1", "127.0.0.3"] {
        client_on(ip).await.send_to(b"ab", server).await.unwrap();
    }
    let stats = wait_for_stats(&handle, "both drops", |s| {
        s.dropped.amplification == 1 && s.dropped.denied == 1
    })
    .await;
    assert_eq!(stats.replied, 1);
    handle.shutdown().await;
}
