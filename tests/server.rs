//! End-to-end tests of the server on loopback sockets.

use std::convert::Infallible;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use abyss::transport::{MulticastV4, UdpOptions};
use abyss::{Request, Server};
use abyss_tests::{
    PATIENCE, ask, assert_accounted, client, client_on, echo, gated, recv_within, settled,
    wait_for_stats,
};
use bytes::Bytes;
use tokio::sync::{Semaphore, mpsc};
use tower::service_fn;

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_peers_at_once_get_byte_identical_replies() {
    let handle = Server::bind(loopback())
        .listeners(2)
        .serve(echo())
        .await
        .unwrap();
    let server = handle.local_addr();

    let mut peers = tokio::task::JoinSet::new();
    for peer in 0..50u32 {
        peers.spawn(async move {
            let socket = client().await;
            // Distinct, binary payloads of distinct lengths, with every byte value.
            let payload: Vec<u8> = (0..(100 + peer * 7))
                .map(|i| (i * 31 + peer) as u8)
                .collect();
            let reply = ask(&socket, server, &payload).await;
            assert_eq!(reply, payload, "peer {peer} got different bytes back");
        });
    }
    while let Some(result) = peers.join_next().await {
        result.expect("peer task");
    }

    let stats = wait_for_stats(&handle, "50 replies counted", |s| s.replied == 50).await;
    assert_eq!(stats.received, 50);
    assert_eq!(stats.dropped.total(), 0);
    assert_accounted(&stats);
    let report = handle.shutdown().await;
    assert_eq!(report.aborted, 0);
}

#[tokio::test]
async fn ipv6_loopback_is_served() {
    let Ok(probe) = std::net::UdpSocket::bind("[::1]:0") else {
        eprintln!("skipped: this machine has no IPv6 loopback (::1)");
        return;
    };
    drop(probe);
    let handle = Server::bind("[::1]:0")
        .listeners(1)
        .serve(echo())
        .await
        .unwrap();
    assert!(handle.local_addr().is_ipv6());
    let socket = client_on("::1").await;
    assert_eq!(
        ask(&socket, handle.local_addr(), b"over six").await,
        b"over six"
    );
    handle.shutdown().await;
}

#[tokio::test]
async fn a_dual_stack_server_answers_ipv4_and_ipv6_peers() {
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("skipped: this machine has no IPv6 loopback (::1)");
        return;
    }
    let handle = Server::bind("[::]:0")
        .listeners(1)
        .udp_options(UdpOptions::new().only_v6(false))
        .serve(echo())
        .await
        .unwrap();
    let port = handle.local_addr().port();
    let v4 = client().await;
    assert_eq!(
        ask(&v4, (Ipv4Addr::LOCALHOST, port).into(), b"v4").await,
        b"v4"
    );
    let v6 = client_on("::1").await;
    assert_eq!(
        ask(&v6, format!("[::1]:{port}").parse().unwrap(), b"v6").await,
        b"v6"
    );
    handle.shutdown().await;
}

/// Panics on "panic", fails on "error", echoes anything else.
fn temperamental() -> impl tower::Service<
    Request,
    Response = Bytes,
    Error = std::io::Error,
    Future = impl Future<Output = Result<Bytes, std::io::Error>> + Send,
> + Clone
+ Send
+ 'static {
    service_fn(|request: Request| async move {
        match request.payload().as_ref() {
            b"panic" => panic!("the handler was asked to panic"),
            b"error" => Err(std::io::Error::other("the handler was asked to fail")),
            _ => Ok(request.into_payload()),
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_leaves_the_server_serving_and_is_counted() {
    let handle = Server::bind(loopback())
        .listeners(1)
        .serve(temperamental())
        .await
        .unwrap();
    let server = handle.local_addr();
    let socket = client().await;
    for _ in 0..10 {
        socket.send_to(b"panic", server).await.unwrap();
    }
    let stats = wait_for_stats(&handle, "10 panics", |s| s.dropped.panicked == 10).await;
    assert_accounted(&stats);
    assert_eq!(ask(&socket, server, b"still there?").await, b"still there?");
    let stats = settled(&handle).await;
    assert_eq!(
        (stats.dropped.panicked, stats.replied, stats.received),
        (10, 1, 11)
    );
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erroring_handler_leaves_the_server_serving_and_is_counted() {
    let handle = Server::bind(loopback())
        .listeners(1)
        .serve(temperamental())
        .await
        .unwrap();
    let server = handle.local_addr();
    let socket = client().await;
    for _ in 0..10 {
        socket.send_to(b"error", server).await.unwrap();
    }
    let stats = wait_for_stats(&handle, "10 handler errors", |s| {
        s.dropped.handler_error == 10
    })
    .await;
    assert_accounted(&stats);
    assert_eq!(ask(&socket, server, b"ok").await, b"ok");
    let stats = settled(&handle).await;
    assert_eq!(
        (stats.dropped.handler_error, stats.replied, stats.received),
        (10, 1, 11)
    );
    assert_eq!(stats.dropped.panicked, 0);
    handle.shutdown().await;
}

/// A handler that reports each start on `started` and then sleeps `work`
/// before echoing.
fn slow(
    work: Duration,
    started: mpsc::UnboundedSender<()>,
) -> impl tower::Service<
    Request,
    Response = Bytes,
    Error = Infallible,
    Future = impl Future<Output = Result<Bytes, Infallible>> + Send,
> + Clone
+ Send
+ 'static {
    service_fn(move |request: Request| {
        let started = started.clone();
        async move {
            let _ = started.send(());
            tokio::time::sleep(work).await;
            Ok(request.into_payload())
        }
    })
}

async fn await_starts(started: &mut mpsc::UnboundedReceiver<()>, n: usize) {
    for i in 0..n {
        tokio::time::timeout(PATIENCE, started.recv())
            .await
            .unwrap_or_else(|_| panic!("only {i} of {n} requests reached the handler"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_answers_every_request_in_flight_within_the_timeout() {
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let handle = Server::bind(loopback())
        .listeners(2)
        .shutdown_timeout(PATIENCE)
        .serve(slow(Duration::from_millis(300), started_tx))
        .await
        .unwrap();
    let server = handle.local_addr();
    let mut sockets = Vec::new();
    for i in 0..5u8 {
        let socket = client().await;
        socket.send_to(&[i; 8], server).await.unwrap();
        sockets.push(socket);
    }
    await_starts(&mut started, 5).await;

    let report = handle.shutdown().await;
    assert_eq!(report.drained, 5);
    assert_eq!(report.aborted, 0);
    for (i, socket) in sockets.iter().enumerate() {
        let (reply, _) = recv_within(socket, PATIENCE)
            .await
            .expect("reply after shutdown began");
        assert_eq!(reply, vec![i as u8; 8]);
    }
    let stats = handle.stats();
    assert_eq!(
        (stats.replied, stats.in_flight, stats.dropped.aborted),
        (5, 0, 0)
    );
    assert_accounted(&stats);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_aborts_and_reports_requests_that_outlive_the_timeout() {
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let handle = Server::bind(loopback())
        .listeners(1)
        .shutdown_timeout(Duration::from_millis(100))
        .serve(slow(Duration::from_secs(3600), started_tx))
        .await
        .unwrap();
    let socket = client().await;
    for i in 0..3u8 {
        socket.send_to(&[i], handle.local_addr()).await.unwrap();
    }
    await_starts(&mut started, 3).await;

    let report = handle.shutdown().await;
    assert_eq!((report.drained, report.aborted), (0, 3));
    let stats = handle.stats();
    assert_eq!(
        (stats.dropped.aborted, stats.in_flight, stats.replied),
        (3, 0, 0)
    );
    assert_accounted(&stats);
}

#[tokio::test]
async fn suspend_closes_the_port_and_resume_answers_again_on_the_same_port() {
    let handle = Server::bind(loopback())
        .listeners(2)
        .serve(echo())
        .await
        .unwrap();
    let server = handle.local_addr();
    let socket = client().await;
    socket.connect(server).await.unwrap();
    socket.send(b"before").await.unwrap();
    assert_eq!(recv_within(&socket, PATIENCE).await.unwrap().0, b"before");

    let report = handle.suspend().await.unwrap();
    assert_eq!(report.aborted, 0);
    // Closed, not just ignoring: the kernel answers with port unreachable,
    // which a connected socket sees as ECONNREFUSED.
    socket.send(b"while suspended").await.unwrap();
    let mut buf = [0u8; 64];
    let refused = tokio::time::timeout(PATIENCE, socket.recv(&mut buf))
        .await
        .expect("an answer from the kernel");
    assert_eq!(
        refused.unwrap_err().kind(),
        std::io::ErrorKind::ConnectionRefused
    );
    // And free: another socket can take it, even without SO_REUSEPORT.
    let squatter = std::net::UdpSocket::bind(server).expect("the suspended port is free");
    drop(squatter);

    let resumed = handle.resume().await.unwrap();
    assert_eq!(resumed, server);
    socket.send(b"after").await.unwrap();
    assert_eq!(recv_within(&socket, PATIENCE).await.unwrap().0, b"after");
    assert!(
        handle.resume().await.is_err(),
        "resuming a running server is an error"
    );
    handle.shutdown().await;
    assert!(
        handle.suspend().await.is_err(),
        "a shut-down server cannot be suspended"
    );
}

#[tokio::test]
async fn resume_with_port_zero_moves_to_a_new_port_when_the_old_one_was_taken() {
    let handle = Server::bind(loopback())
        .listeners(1)
        .serve(echo())
        .await
        .unwrap();
    let first = handle.local_addr();
    handle.suspend().await.unwrap();
    let squatter = std::net::UdpSocket::bind(first).unwrap();
    let second = handle.resume().await.unwrap();
    assert_ne!(second.port(), first.port());
    assert_eq!(handle.local_addr(), second);
    let socket = client().await;
    assert_eq!(ask(&socket, second, b"moved").await, b"moved");
    drop(squatter);
    handle.shutdown().await;
}

#[tokio::test]
async fn a_datagram_larger_than_the_receive_buffer_is_dropped_and_counted_as_truncated() {
    let handle = Server::bind(loopback())
        .listeners(1)
        .max_datagram_size(512)
        .serve(echo())
        .await
        .unwrap();
    let server = handle.local_addr();
    let socket = client().await;
    socket.send_to(&[7u8; 513], server).await.unwrap();
    socket.send_to(&[9u8; 4000], server).await.unwrap();
    wait_for_stats(&handle, "2 truncated datagrams", |s| {
        s.dropped.truncated == 2
    })
    .await;
    // The next reply is the exact-fit datagram's, not a cut-down copy of the
    // ones before it.
    assert_eq!(ask(&socket, server, &[1u8; 512]).await, vec![1u8; 512]);
    let stats = settled(&handle).await;
    assert_eq!(
        (stats.received, stats.replied, stats.dropped.truncated),
        (3, 1, 2)
    );
    assert_accounted(&stats);
    handle.shutdown().await;
}

#[tokio::test]
async fn a_server_on_the_wildcard_address_answers_from_the_address_it_was_asked_on() {
    let handle = Server::bind("0.0.0.0:0")
        .listeners(1)
        .serve(service_fn(|request: Request| async move {
            // Tell the peer which local address the request came to.
            Ok::<_, Infallible>(request.local().to_string())
        }))
        .await
        .unwrap();
    let port = handle.local_addr().port();
    let socket = client().await;
    for ip in ["127.0.0.1", "127.0.0.2"] {
        let target: SocketAddr = format!("{ip}:{port}").parse().unwrap();
        socket.send_to(b"who are you", target).await.unwrap();
        let (reply, from) = recv_within(&socket, PATIENCE).await.expect("reply");
        assert_eq!(from, target, "the reply must come from the address asked");
        assert_eq!(String::from_utf8(reply).unwrap(), target.to_string());
    }
    handle.shutdown().await;
}

#[tokio::test]
async fn a_handler_can_send_to_other_addresses_through_the_send_handle() {
    let observer = client().await;
    let observer_addr = observer.local_addr().unwrap();
    let handle = Server::bind(loopback())
        .listeners(1)
        .serve(service_fn(move |request: Request| async move {
            request
                .sender()
                .send_to(observer_addr, request.payload())
                .await?;
            Ok::<_, std::io::Error>(())
        }))
        .await
        .unwrap();
    let socket = client().await;
    socket
        .send_to(b"forward me", handle.local_addr())
        .await
        .unwrap();
    let (copy, from) = recv_within(&observer, PATIENCE)
        .await
        .expect("forwarded copy");
    assert_eq!(copy, b"forward me");
    assert_eq!(
        from,
        handle.local_addr(),
        "sent from the server's own socket"
    );
    let stats = wait_for_stats(&handle, "one datagram handled", |s| s.no_reply == 1).await;
    assert_eq!(stats.replied, 0);
    assert!(
        recv_within(&socket, Duration::from_millis(50))
            .await
            .is_none()
    );
    handle.shutdown().await;
}

#[tokio::test]
async fn listeners_on_port_zero_share_one_port() {
    let handle = Server::bind(loopback())
        .listeners(4)
        .serve(echo())
        .await
        .unwrap();
    let server = handle.local_addr();
    // Many source ports, so the kernel spreads them over the four sockets.
    for i in 0..32u8 {
        let socket = client().await;
        assert_eq!(ask(&socket, server, &[i]).await, vec![i]);
    }
    handle.shutdown().await;
}

#[tokio::test]
async fn zero_listeners_is_a_configuration_error() {
    let error = Server::bind(loopback())
        .listeners(0)
        .serve(echo())
        .await
        .unwrap_err();
    assert_eq!(error.field(), Some("listeners"));
    assert!(error.to_string().contains("listeners"), "{error}");
}

#[tokio::test]
async fn fewer_requests_in_flight_than_listeners_is_a_configuration_error() {
    let error = Server::bind(loopback())
        .listeners(4)
        .max_in_flight(3)
        .build()
        .unwrap_err();
    assert_eq!(error.field(), Some("max_in_flight"));
    let error = Server::bind(loopback())
        .max_in_flight(0)
        .build()
        .unwrap_err();
    assert_eq!(error.field(), Some("max_in_flight"));
}

#[tokio::test]
async fn an_impossible_datagram_size_is_a_configuration_error() {
    for size in [0, 65_536] {
        let error = Server::bind(loopback())
            .max_datagram_size(size)
            .build()
            .unwrap_err();
        assert_eq!(error.field(), Some("max_datagram_size"), "size {size}");
    }
}

#[tokio::test]
async fn a_port_in_use_is_a_bind_error() {
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let error = Server::bind(taken.local_addr().unwrap())
        .listeners(1)
        .serve(echo())
        .await
        .unwrap_err();
    assert!(error.is_addr_in_use(), "{error:?}");
    assert!(
        error
            .to_string()
            .contains(&taken.local_addr().unwrap().to_string()),
        "{error}"
    );
}

#[tokio::test]
async fn a_unicast_address_given_as_a_multicast_group_is_a_configuration_error() {
    let options = UdpOptions::new().join_multicast_v4(MulticastV4::new(
        Ipv4Addr::new(10, 1, 2, 3),
        Ipv4Addr::UNSPECIFIED,
    ));
    let error = Server::bind(loopback())
        .udp_options(options)
        .build()
        .unwrap_err();
    assert_eq!(error.field(), Some("join_multicast_v4"));
    assert!(error.to_string().contains("10.1.2.3"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_service_leaves_datagrams_in_the_kernel_and_serves_them_later() {
    // One request at a time, each waiting for a permit from the test.
    let gate = Arc::new(Semaphore::new(0));
    let service = tower::ServiceBuilder::new()
        .concurrency_limit(1)
        .service(gated(gate.clone()));
    let handle = Server::bind(loopback())
        .listeners(1)
        .serve(service)
        .await
        .unwrap();
    let server = handle.local_addr();
    let socket = client().await;
    for i in 0..100u8 {
        socket.send_to(&[i], server).await.unwrap();
    }
    wait_for_stats(&handle, "the first request", |s| s.received >= 1).await;
    // The service is not ready, so the listener holds at most one batch
    // (32 datagrams) beyond the request being handled; the rest waits in
    // the kernel's socket buffer.
    for _ in 0..50 {
        let stats = handle.stats();
        assert!(
            stats.received <= 33,
            "read past the backpressure: {stats:?}"
        );
        tokio::task::yield_now().await;
    }
    gate.add_permits(100);
    let mut replies = 0;
    while recv_within(&socket, PATIENCE).await.is_some() {
        replies += 1;
        if replies == 100 {
            break;
        }
    }
    assert_eq!(replies, 100);
    let stats = settled(&handle).await;
    assert_eq!((stats.received, stats.replied), (100, 100));
    handle.shutdown().await;
}

#[tokio::test]
async fn a_gso_burst_to_a_gro_server_is_answered_datagram_by_datagram() {
    use abyss::transport::{Transmit, Transport, UdpTransport};
    let handle = Server::bind(loopback())
        .listeners(1)
        .udp_options(UdpOptions::new().gro(true))
        .serve(echo())
        .await
        .unwrap();
    let client = UdpTransport::bind(loopback(), &UdpOptions::new()).unwrap();
    if client.max_transmit_segments() < 2 {
        eprintln!("skipped: this kernel has no UDP GSO");
        return;
    }
    // Ten 64-byte datagrams, each with its own first byte, in one transmit.
    let burst: Vec<u8> = (0..10u8).flat_map(|i| [i; 64]).collect();
    let mut transmit = Transmit::new(handle.local_addr(), &burst);
    transmit.segment_size = Some(64);
    std::future::poll_fn(|cx| client.poll_send(cx, std::slice::from_ref(&transmit)))
        .await
        .unwrap();
    let receiver = client.as_tokio();
    let mut buf = [0u8; 1024];
    for i in 0..10u8 {
        let (n, _) = tokio::time::timeout(PATIENCE, receiver.recv_from(&mut buf))
            .await
            .expect("every datagram of the burst is answered")
            .unwrap();
        assert_eq!(&buf[..n], &[i; 64][..], "reply {i}");
    }
    let stats = wait_for_stats(&handle, "10 replies", |s| s.replied == 10).await;
    assert_eq!(stats.received, 10, "counted per datagram, not per buffer");
    handle.shutdown().await;
}

#[tokio::test]
async fn a_gro_buffer_is_checked_datagram_by_datagram_against_the_size_limit() {
    use abyss::transport::{Transmit, Transport, UdpTransport};
    let handle = Server::bind(loopback())
        .listeners(1)
        .max_datagram_size(32)
        .udp_options(UdpOptions::new().gro(true))
        .serve(echo())
        .await
        .unwrap();
    let client = UdpTransport::bind(loopback(), &UdpOptions::new()).unwrap();
    if client.max_transmit_segments() < 2 {
        eprintln!("skipped: this kernel has no UDP GSO");
        return;
    }
    // Four 64-byte datagrams, over the 32-byte limit, coalesced on arrival.
    let burst = [7u8; 256];
    let mut transmit = Transmit::new(handle.local_addr(), &burst);
    transmit.segment_size = Some(64);
    std::future::poll_fn(|cx| client.poll_send(cx, std::slice::from_ref(&transmit)))
        .await
        .unwrap();
    let stats = wait_for_stats(&handle, "four truncated", |s| s.dropped.truncated == 4).await;
    assert_eq!((stats.received, stats.replied), (4, 0));
    assert_accounted(&stats);
    handle.shutdown().await;
}

#[tokio::test]
async fn a_second_server_on_a_held_port_is_refused_as_in_use() {
    let first = Server::bind(loopback())
        .listeners(2)
        .serve(echo())
        .await
        .unwrap();
    let second = Server::bind(first.local_addr())
        .listeners(2)
        .serve(echo())
        .await
        .unwrap_err();
    assert!(second.is_addr_in_use(), "{second:?}");
    // The first server still has every peer.
    for i in 0..16u8 {
        let socket = client().await;
        assert_eq!(ask(&socket, first.local_addr(), &[i]).await, vec![i]);
    }
    first.shutdown().await;
}

#[tokio::test]
async fn a_port_held_by_another_programs_sharing_socket_is_refused_unless_sharing_is_asked_for() {
    // Another program's socket, bound with SO_REUSEPORT: it would share its
    // port with anyone.
    let holder =
        abyss::transport::UdpTransport::bind(loopback(), &UdpOptions::new().share_port(true))
            .unwrap();
    let held = abyss::transport::Transport::local_addr(&holder).unwrap();
    let error = Server::bind(held)
        .listeners(1)
        .serve(echo())
        .await
        .unwrap_err();
    assert!(error.is_addr_in_use(), "{error:?}");

    let shared = Server::bind(held)
        .listeners(1)
        .udp_options(UdpOptions::new().share_port(true))
        .serve(echo())
        .await
        .expect("sharing, asked for, works");
    assert_eq!(shared.local_addr(), held);
    shared.shutdown().await;
}

#[tokio::test]
async fn an_empty_reply_behind_a_reply_to_the_same_peer_is_sent_too() {
    let handle = Server::bind(loopback())
        .listeners(1)
        .serve(echo())
        .await
        .unwrap();
    let socket = client().await;
    // Pairs of a 64-byte and an empty datagram, sent before any is read, so
    // the replies leave in one flush.
    for _ in 0..20 {
        socket
            .send_to(&[7u8; 64], handle.local_addr())
            .await
            .unwrap();
        socket.send_to(&[], handle.local_addr()).await.unwrap();
    }
    let mut sizes = Vec::new();
    while sizes.len() < 40 {
        let Some((reply, _)) = recv_within(&socket, PATIENCE).await else {
            break;
        };
        sizes.push(reply.len());
    }
    let stats = settled(&handle).await;
    assert_eq!(stats.replied, 40, "{stats:?}");
    assert_eq!(
        (
            sizes.iter().filter(|&&n| n == 64).count(),
            sizes.iter().filter(|&&n| n == 0).count()
        ),
        (20, 20),
        "every reply counted as sent arrives: {sizes:?}"
    );
    handle.shutdown().await;
}

#[tokio::test]
async fn a_datagram_to_the_loopback_broadcast_address_is_answered_from_the_host() {
    let handle = Server::bind("0.0.0.0:0")
        .listeners(1)
        .serve(echo())
        .await
        .unwrap();
    let port = handle.local_addr().port();
    let socket = client().await;
    socket.set_broadcast(true).unwrap();
    socket
        .send_to(b"anyone?", ("127.255.255.255", port))
        .await
        .unwrap();
    let (reply, from) = recv_within(&socket, PATIENCE)
        .await
        .expect("a reply to a broadcast datagram");
    assert_eq!(reply, b"anyone?");
    assert_eq!(from, SocketAddr::from(([127, 0, 0, 1], port)));
    let stats = settled(&handle).await;
    assert_eq!((stats.replied, stats.dropped.send_failed), (1, 0));
    handle.shutdown().await;
}

#[tokio::test]
async fn a_broadcast_datagram_is_handled_once_whatever_the_number_of_listeners() {
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let handle = Server::bind("0.0.0.0:0")
        .listeners(3)
        .serve(service_fn({
            let calls = calls.clone();
            move |request: Request| {
                calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async move { Ok::<_, Infallible>(request.into_payload()) }
            }
        }))
        .await
        .unwrap();
    let port = handle.local_addr().port();
    let socket = client().await;
    socket.set_broadcast(true).unwrap();
    for i in 0..10u8 {
        socket
            .send_to(&[i], ("127.255.255.255", port))
            .await
            .unwrap();
    }
    let mut replies = Vec::new();
    while replies.len() < 10 {
        let (reply, _) = recv_within(&socket, PATIENCE).await.expect("a reply");
        replies.push(reply[0]);
    }
    let stats = wait_for_stats(&handle, "two skipped copies of each", |s| {
        s.group_copies_skipped == 20 && s.in_flight == 0
    })
    .await;
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 10);
    assert_eq!((stats.received, stats.replied), (10, 10), "{stats:?}");
    assert!(
        recv_within(&socket, Duration::from_millis(50))
            .await
            .is_none(),
        "one reply per datagram"
    );
    handle.shutdown().await;
}

#[tokio::test]
async fn datagrams_queued_when_the_socket_closes_are_counted_as_unread() {
    let gate = Arc::new(Semaphore::new(0));
    let handle = Server::bind(loopback())
        .listeners(1)
        .max_in_flight(1)
        .shutdown_timeout(Duration::from_millis(50))
        .serve(gated(gate.clone()))
        .await
        .unwrap();
    let socket = client().await;
    let sent = 300u64;
    for i in 0..sent {
        socket
            .send_to(&i.to_be_bytes(), handle.local_addr())
            .await
            .unwrap();
    }
    // One is being handled (and never finishes); the rest wait in the
    // socket's queue, or were dropped by the kernel once it was full.
    wait_for_stats(&handle, "one datagram in flight", |s| s.in_flight == 1).await;
    let report = handle.shutdown().await;
    assert_eq!(report.aborted, 1);
    let stats = handle.stats();
    assert!(stats.unread_at_close > 0, "{stats:?}");
    assert_eq!(
        stats.received + stats.kernel_drops.unwrap() + stats.unread_at_close,
        sent,
        "every datagram the kernel took is accounted for: {stats:?}"
    );
    assert_accounted(&stats);
}

#[tokio::test]
async fn a_suspended_server_counts_what_was_queued_and_refuses_what_comes_after() {
    let gate = Arc::new(Semaphore::new(0));
    let handle = Server::bind(loopback())
        .listeners(2)
        .max_in_flight(2)
        .shutdown_timeout(Duration::from_millis(50))
        .serve(gated(gate.clone()))
        .await
        .unwrap();
    let mut sent = 0u64;
    let mut sockets = Vec::new();
    for _ in 0..8 {
        let socket = client().await;
        for _ in 0..20 {
            socket
                .send_to(b"queued", handle.local_addr())
                .await
                .unwrap();
            sent += 1;
        }
        sockets.push(socket);
    }
    wait_for_stats(&handle, "both listeners full", |s| s.in_flight == 2).await;
    handle.suspend().await.unwrap();
    let stats = handle.stats();
    assert_eq!(handle.live_listeners(), 0);
    assert_eq!(
        stats.received + stats.kernel_drops.unwrap() + stats.unread_at_close,
        sent,
        "{stats:?}"
    );
    assert_accounted(&stats);
    handle.shutdown().await;
}

#[test]
fn port_zero_never_gives_a_port_another_program_holds_even_one_that_shares() {
    // In a namespace of its own, so its ephemeral range can be narrowed to
    // two ports, both held by another program's sharing sockets.
    let Some(netns) = abyss_tests::Netns::new("port0") else {
        return;
    };
    netns.run(&[
        "sysctl",
        "-q",
        "-w",
        "net.ipv4.ip_local_port_range=40000 40001",
    ]);
    let outcome = netns
        .spawn(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let sharing = UdpOptions::new().share_port(true);
                let holders: Vec<_> = [40000, 40001]
                    .map(|port| {
                        abyss::transport::UdpTransport::bind(
                            SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                            &sharing,
                        )
                        .unwrap()
                    })
                    .into();
                let served = Server::bind(loopback()).listeners(2).serve(echo()).await;
                drop(holders);
                match served {
                    Ok(handle) => {
                        let port = handle.local_addr().port();
                        handle.shutdown().await;
                        Err(port)
                    }
                    Err(error) => Ok(error.to_string()),
                }
            })
        })
        .join()
        .unwrap();
    match outcome {
        Ok(error) => assert!(error.contains("cannot bind"), "{error}"),
        Err(port) => panic!("port 0 gave port {port}, which another program holds"),
    }
}

#[tokio::test]
async fn a_server_asking_for_broadcast_runs_one_listener_unless_told_otherwise() {
    let broadcast = UdpOptions::new().broadcast(true);
    let handle = Server::bind(loopback())
        .udp_options(broadcast.clone())
        .serve(echo())
        .await
        .unwrap();
    assert_eq!(handle.live_listeners(), 1);
    handle.shutdown().await;
    let handle = Server::bind(loopback())
        .listeners(2)
        .udp_options(broadcast)
        .serve(echo())
        .await
        .unwrap();
    assert_eq!(handle.live_listeners(), 2);
    handle.shutdown().await;
}

/// How many handlers run at once, and the most that ever did.
#[derive(Default)]
struct Overlap {
    now: std::sync::atomic::AtomicUsize,
    most: std::sync::atomic::AtomicUsize,
}

/// A handler that computes for `micros` microseconds per datagram, and
/// records how many ran at the same time.
fn heavy(
    micros: u64,
    overlap: Arc<Overlap>,
) -> impl tower::Service<
    Request,
    Response = Bytes,
    Error = Infallible,
    Future = impl Future<Output = Result<Bytes, Infallible>> + Send,
> + Clone
+ Send
+ 'static {
    use std::sync::atomic::Ordering::SeqCst;
    service_fn(move |request: Request| {
        let overlap = overlap.clone();
        async move {
            let running = overlap.now.fetch_add(1, SeqCst) + 1;
            overlap.most.fetch_max(running, SeqCst);
            let start = std::time::Instant::now();
            while start.elapsed() < Duration::from_micros(micros) {
                std::hint::spin_loop();
            }
            overlap.now.fetch_sub(1, SeqCst);
            Ok(request.into_payload())
        }
    })
}

/// Asks `count` questions from one socket, `window` at a time.
async fn one_peer_asks(server: SocketAddr, count: usize, window: usize) {
    let socket = client().await;
    let mut sent = 0;
    let mut answered = 0;
    while answered < count {
        while sent < count && sent - answered < window {
            socket.send_to(&[7u8; 8], server).await.unwrap();
            sent += 1;
        }
        recv_within(&socket, PATIENCE).await.expect("an answer");
        answered += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_handlers_of_one_peer_run_on_every_worker_and_cheap_ones_stay_inline() {
    for (dispatch, micros, parallel) in [
        (abyss::Dispatch::Auto, 200, true),
        (abyss::Dispatch::Inline, 200, false),
        (abyss::Dispatch::Auto, 0, false),
    ] {
        let overlap = Arc::new(Overlap::default());
        let handle = Server::bind(loopback())
            .listeners(1)
            .dispatch(dispatch)
            .serve(heavy(micros, Arc::clone(&overlap)))
            .await
            .unwrap();
        one_peer_asks(handle.local_addr(), 600, 32).await;
        let stats = settled(&handle).await;
        assert_eq!(stats.replied, 600, "{stats:?}");
        let most = overlap.most.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(
            most > 1,
            parallel,
            "{dispatch:?} with {micros} us handlers: at most {most} at once"
        );
        handle.shutdown().await;
    }
}

#[tokio::test]
async fn peers_of_one_network_share_its_prefix_rate_limit() {
    let handle = Server::bind("0.0.0.0:0")
        .rate_limit(abyss::middleware::RateQuota::new(
            10,
            Duration::from_secs(60),
        ))
        // Two datagrams a minute for each /24.
        .prefix_rate_limit(abyss::middleware::RateQuota::new(
            2,
            Duration::from_secs(60),
        ))
        .serve(echo())
        .await
        .unwrap();
    let server = SocketAddr::from((Ipv4Addr::LOCALHOST, handle.local_addr().port()));
    let (a, b) = (client_on("127.0.0.1").await, client_on("127.0.0.2").await);
    assert_eq!(ask(&a, server, b"one").await, b"one");
    assert_eq!(ask(&b, server, b"two").await, b"two");
    // Each peer is within its own quota, but their /24 has spent its own.
    b.send_to(b"three", server).await.unwrap();
    let stats = abyss_tests::wait_for_stats(&handle, "the third datagram dropped", |s| {
        s.dropped.rate_limited == 1
    })
    .await;
    assert_eq!(stats.replied, 2);
    // Another network is not held back.
    let other = client_on("127.1.0.1").await;
    assert_eq!(ask(&other, server, b"four").await, b"four");
    handle.shutdown().await;
}

/// Set in the environment of the child process of
/// [`a_socket_handed_over_by_systemd_is_served_as_it_is`].
const SYSTEMD_CHILD: &str = "ABYSS_TEST_SYSTEMD_CHILD";

/// Serves the datagram socket systemd's `systemd-socket-activate` passes
/// to a child process (this test binary, running
/// [`socket_activated_child`]): the child answers on the address systemd
/// bound, though it bound nothing itself.
#[test]
fn a_socket_handed_over_by_systemd_is_served_as_it_is() {
    if std::process::Command::new("systemd-socket-activate")
        .arg("--help")
        .output()
        .is_err()
    {
        eprintln!("skipped: systemd-socket-activate is not installed (apt-get install systemd)");
        return;
    }
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut child = std::process::Command::new("systemd-socket-activate")
        .args(["--datagram", "-l", &addr.to_string(), "-E", SYSTEMD_CHILD])
        .arg(std::env::current_exe().unwrap())
        .args([
            "socket_activated_child",
            "--exact",
            "--include-ignored",
            "--nocapture",
        ])
        .env(SYSTEMD_CHILD, "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 64];
    let deadline = std::time::Instant::now() + PATIENCE;
    // The socket exists before the child starts: datagrams wait in it.
    let answered = loop {
        client.send_to(b"activated", addr).unwrap();
        if let Ok((n, _)) = client.recv_from(&mut buf) {
            break buf[..n].to_vec();
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!(
                "no answer from the socket-activated child:\n{}\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    };
    assert_eq!(answered, b"activated");
    client.send_to(b"stop", addr).unwrap();
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "the child test failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The half of [`a_socket_handed_over_by_systemd_is_served_as_it_is`] that
/// systemd starts: serves the socket it was given until told to stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by systemd-socket-activate in a_socket_handed_over_by_systemd_is_served_as_it_is"]
async fn socket_activated_child() {
    if std::env::var_os(SYSTEMD_CHILD).is_none() {
        eprintln!(
            "nothing to do outside the child process of a_socket_handed_over_by_systemd_is_served_as_it_is"
        );
        return;
    }
    let sockets = abyss::transport::BoundSockets::from_systemd()
        .unwrap()
        .expect("a socket from systemd");
    assert!(
        abyss::transport::BoundSockets::from_systemd()
            .unwrap()
            .is_none(),
        "taken once"
    );
    let addr = sockets.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let stop = Arc::new(std::sync::Mutex::new(Some(stop)));
    let handle = Server::builder()
        .bound_sockets(sockets)
        .serve(service_fn(move |request: Request| {
            if request.payload().as_ref() == b"stop"
                && let Some(stop) = stop.lock().unwrap().take()
            {
                let _ = stop.send(());
            }
            async move { Ok::<_, Infallible>(Some(request.into_payload())) }
        }))
        .await
        .unwrap();
    assert_eq!(handle.local_addr(), addr);
    let _ = tokio::time::timeout(PATIENCE, stopped).await;
    let stats = handle.stats();
    assert!(stats.replied >= 1, "{stats:?}");
    handle.shutdown().await;
}

#[tokio::test]
async fn bound_sockets_are_served_once_then_the_address_is_bound_afresh() {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    // As many listeners as sockets, or the server does not start.
    let wrong = Server::builder()
        .bound_sockets(
            abyss::transport::BoundSockets::new(vec![socket.try_clone().unwrap()]).unwrap(),
        )
        .listeners(2)
        .serve(echo())
        .await
        .unwrap_err();
    let chain = format!(
        "{wrong}: {}",
        std::error::Error::source(&wrong)
            .map(ToString::to_string)
            .unwrap_or_default()
    );
    assert!(chain.contains("listeners"), "{chain}");

    let handle = Server::builder()
        .bound_sockets(abyss::transport::BoundSockets::new(vec![socket]).unwrap())
        .serve(echo())
        .await
        .unwrap();
    let client = client().await;
    assert_eq!(ask(&client, addr, b"given").await, b"given");
    // After a suspend, the given socket is closed: resume binds the same
    // address afresh.
    handle.suspend().await.unwrap();
    assert_eq!(handle.resume().await.unwrap(), addr);
    assert_eq!(ask(&client, addr, b"afresh").await, b"afresh");
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_service_finishes_what_it_has_in_flight_and_the_new_one_takes_the_rest() {
    use abyss::reload::Reloadable;

    fn version(
        tag: &'static str,
        delay: Duration,
    ) -> impl tower::Service<
        Request,
        Response = Bytes,
        Error = Infallible,
        Future = impl Future<Output = Result<Bytes, Infallible>> + Send,
    > + Clone
    + Send
    + 'static {
        service_fn(move |_: Request| async move {
            tokio::time::sleep(delay).await;
            Ok::<_, Infallible>(Bytes::from_static(tag.as_bytes()))
        })
    }

    let (service, reloader) = Reloadable::new(version("v1", Duration::from_millis(300)));
    let handle = Server::bind("127.0.0.1:0")
        .listeners(1)
        .serve(service)
        .await
        .unwrap();
    let socket = client().await;
    for _ in 0..3 {
        socket.send_to(b"?", handle.local_addr()).await.unwrap();
    }
    // The three are in v1's hands when v2 comes.
    abyss_tests::wait_for_stats(&handle, "three in flight", |s| s.in_flight == 3).await;
    reloader.replace(version("v2", Duration::ZERO));
    for _ in 0..3 {
        socket.send_to(b"?", handle.local_addr()).await.unwrap();
    }
    let mut replies = Vec::new();
    for _ in 0..6 {
        let (reply, _) = recv_within(&socket, PATIENCE).await.expect("a reply");
        replies.push(String::from_utf8(reply).unwrap());
    }
    // v2 answers at once, v1 after its delay: nothing lost either way.
    assert_eq!(replies, ["v2", "v2", "v2", "v1", "v1", "v1"]);
    let stats = settled(&handle).await;
    assert_eq!(stats.replied, 6);
    assert_eq!(reloader.generation(), 1);
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handover_under_steady_traffic_loses_no_datagram() {
    use abyss::transport::BoundSockets;
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::{AtomicU64, Ordering};

    let old = Server::bind("127.0.0.1:0")
        .listeners(2)
        .serve(echo())
        .await
        .unwrap();
    let addr = old.local_addr();
    const PEERS: usize = 4;
    const EACH: u64 = 400;
    let answered = Arc::new(AtomicU64::new(0));
    let slowest = Arc::new(AtomicU64::new(0));
    let (halfway, mut started) = mpsc::unbounded_channel();
    let mut peers = tokio::task::JoinSet::new();
    for _ in 0..PEERS {
        let (answered, slowest, halfway) = (answered.clone(), slowest.clone(), halfway.clone());
        peers.spawn(async move {
            let socket = client().await;
            let mut buf = [0u8; 64];
            for i in 0..EACH {
                if i == EACH / 4 {
                    let _ = halfway.send(());
                }
                let sent = tokio::time::Instant::now();
                socket.send_to(&i.to_be_bytes(), addr).await.unwrap();
                // One in flight per peer: a lost datagram shows as no reply.
                let (n, _) = tokio::time::timeout(PATIENCE, socket.recv_from(&mut buf))
                    .await
                    .expect("every datagram answered")
                    .unwrap();
                assert_eq!(&buf[..n], &i.to_be_bytes());
                answered.fetch_add(1, Ordering::Relaxed);
                let took = sent.elapsed().as_micros() as u64;
                slowest.fetch_max(took, Ordering::Relaxed);
            }
        });
    }
    // A quarter of the way in, a successor takes the port over.
    started.recv().await.unwrap();
    let (ours, theirs) = UnixStream::pair().unwrap();
    // Non-blocking, as a stream accepted with tokio is: hand_over copes.
    ours.set_nonblocking(true).unwrap();
    let handing = tokio::spawn({
        let old = old.clone();
        async move { old.hand_over(ours).await }
    });
    let (sockets, stream) = tokio::task::spawn_blocking(move || {
        BoundSockets::receive(&theirs).map(|sockets| (sockets, theirs))
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(sockets.len(), 2, "every listener's socket");
    let new = Server::builder()
        .bound_sockets(sockets)
        .serve(echo())
        .await
        .unwrap();
    abyss::successor_ready(&stream).unwrap();
    let report = handing.await.unwrap().unwrap();
    assert_eq!(report.aborted, 0);
    assert_eq!(old.state(), abyss::ServerState::Stopped);
    while let Some(done) = peers.join_next().await {
        done.unwrap();
    }
    let total = PEERS as u64 * EACH;
    assert_eq!(answered.load(Ordering::Relaxed), total);
    let (before, after) = (old.stats(), settled(&new).await);
    assert_eq!(
        before.replied + after.replied,
        total,
        "old {before:?} new {after:?}"
    );
    assert!(after.replied > 0, "the successor served");
    assert_eq!(
        before.unread_at_close, 0,
        "nothing left unread in a handed-over socket"
    );
    println!(
        "reliability: handover | {PEERS} peers x {EACH} datagrams, 1 in flight each, 2 listeners | sockets handed to a successor a quarter of the way in | sent={total} replied={} (old {}, new {}) slowest round trip {} us | unaccounted=0",
        before.replied + after.replied,
        before.replied,
        after.replied,
        slowest.load(Ordering::Relaxed)
    );
    new.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_that_goes_away_before_it_serves_leaves_the_server_serving() {
    use std::os::unix::net::UnixStream;

    let old = Server::bind("127.0.0.1:0").serve(echo()).await.unwrap();
    let (ours, theirs) = UnixStream::pair().unwrap();
    let handing = tokio::spawn({
        let old = old.clone();
        async move { old.hand_over(ours).await }
    });
    // The successor takes the sockets, then dies before it serves them.
    tokio::task::spawn_blocking(move || {
        let sockets = abyss::transport::BoundSockets::receive(&theirs).unwrap();
        drop((sockets, theirs));
    })
    .await
    .unwrap();
    let error = handing.await.unwrap().unwrap_err();
    assert!(matches!(error, abyss::Error::Handover { .. }), "{error}");
    assert_eq!(old.state(), abyss::ServerState::Serving);
    let socket = client().await;
    assert_eq!(
        ask(&socket, old.local_addr(), b"still mine").await,
        b"still mine"
    );
    old.shutdown().await;
}

#[tokio::test]
async fn the_kernel_tells_each_datagrams_interface_tos_and_arrival_time() {
    let handle = Server::bind("127.0.0.1:0")
        .udp_options(UdpOptions::new().receive_tos(true).receive_timestamps(true))
        .serve(service_fn(|request: Request| async move {
            let age = request
                .kernel_received_at()
                .and_then(|at| std::time::SystemTime::now().duration_since(at).ok());
            Ok::<_, Infallible>(format!(
                "{:?} {:?} {}",
                request.interface(),
                request.tos(),
                age.is_some_and(|age| age < Duration::from_secs(60))
            ))
        }))
        .await
        .unwrap();
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    // DSCP AF11 (0x28) with ECT(0) (0x02).
    socket2::SockRef::from(&socket).set_tos_v4(0x2a).unwrap();
    socket.set_nonblocking(true).unwrap();
    let socket = tokio::net::UdpSocket::from_std(socket).unwrap();
    let reply = ask(&socket, handle.local_addr(), b"?").await;
    assert_eq!(
        std::str::from_utf8(&reply).unwrap(),
        "Some(1) Some(42) true"
    );
    handle.shutdown().await;
}

#[tokio::test]
async fn a_reply_goes_out_with_the_tos_the_service_gives_it() {
    use abyss::transport::{RecvMeta, Transmit, Transport, UdpTransport};
    use std::future::poll_fn;
    use std::io::IoSliceMut;

    let handle = Server::bind("127.0.0.1:0")
        .serve(service_fn(|request: Request| async move {
            // DSCP EF for "voice", unmarked otherwise.
            let reply = abyss::Reply::new(request.payload().clone());
            Ok::<_, Infallible>(if request.payload().as_ref() == b"voice" {
                reply.with_tos(46 << 2)
            } else {
                reply
            })
        }))
        .await
        .unwrap();
    // A client that reads the TOS byte of what it receives.
    let client = UdpTransport::bind(
        "127.0.0.1:0".parse().unwrap(),
        &UdpOptions::new().receive_tos(true),
    )
    .unwrap();
    let tos_of = async |payload: &[u8]| {
        let to = handle.local_addr();
        poll_fn(|cx| client.poll_send(cx, &[Transmit::new(to, payload)]))
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let mut meta = [RecvMeta::default()];
        tokio::time::timeout(
            PATIENCE,
            poll_fn(|cx| client.poll_recv(cx, &mut [IoSliceMut::new(&mut buf)], &mut meta)),
        )
        .await
        .expect("a reply")
        .unwrap();
        meta[0].tos
    };
    assert_eq!(tos_of(b"voice").await, Some(0xb8));
    assert_eq!(tos_of(b"data").await, Some(0));
    handle.shutdown().await;
}
