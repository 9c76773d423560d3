//! UdpTransport against real loopback sockets.

use std::future::poll_fn;
use std::io::IoSliceMut;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use abyss_transport::{Bind, RecvMeta, Transmit, Transport, UdpOptions, UdpTransport};
use tokio::net::UdpSocket;

const PATIENCE: Duration = Duration::from_secs(10);

fn bind(addr: &str, options: &UdpOptions) -> UdpTransport {
    UdpTransport::bind(addr.parse().unwrap(), options).unwrap()
}

/// Receives one batch of up to `slots` datagrams of `slot` bytes each.
async fn recv_batch(
    transport: &dyn Transport,
    slots: usize,
    slot: usize,
) -> Vec<(RecvMeta, Vec<u8>)> {
    let mut storage = vec![vec![0u8; slot]; slots];
    let mut meta = vec![RecvMeta::default(); slots];
    let n = tokio::time::timeout(
        PATIENCE,
        poll_fn(|cx| {
            let mut bufs: Vec<IoSliceMut<'_>> =
                storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            transport.poll_recv(cx, &mut bufs, &mut meta)
        }),
    )
    .await
    .expect("a datagram within the patience")
    .expect("poll_recv");
    (0..n)
        .map(|i| (meta[i], storage[i][..meta[i].len].to_vec()))
        .collect()
}

#[tokio::test]
async fn a_datagram_longer_than_its_buffer_is_flagged_truncated_and_an_exact_fit_is_not() {
    let server = bind("127.0.0.1:0", &UdpOptions::new());
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let to = server.local_addr().unwrap();
    client.send_to(&[1u8; 100], to).await.unwrap();
    client.send_to(&[2u8; 101], to).await.unwrap();

    let first = recv_batch(&server, 1, 100).await;
    assert_eq!(first[0].0.len, 100);
    assert!(!first[0].0.truncated, "an exact fit is whole");
    let second = recv_batch(&server, 1, 100).await;
    assert!(second[0].0.truncated, "101 bytes do not fit 100");
    assert_eq!(second[0].0.peer, client.local_addr().unwrap());
}

#[tokio::test]
async fn queued_datagrams_come_back_in_one_batch() {
    let server = bind("127.0.0.1:0", &UdpOptions::new());
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for i in 0..5u8 {
        client
            .send_to(&[i; 3], server.local_addr().unwrap())
            .await
            .unwrap();
    }
    // Wait for the first so that all five are queued (loopback delivers in order
    // inside the send call).
    let mut got = Vec::new();
    while got.len() < 5 {
        got.extend(recv_batch(&server, 8, 64).await);
    }
    assert_eq!(got.len(), 5);
    for (i, (meta, payload)) in got.iter().enumerate() {
        assert_eq!(payload, &vec![i as u8; 3]);
        assert_eq!(meta.stride, 3);
    }
}

#[tokio::test]
async fn a_wildcard_socket_reports_and_answers_from_the_destination_address() {
    let server = bind("0.0.0.0:0", &UdpOptions::new());
    let port = server.local_addr().unwrap().port();
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let target: SocketAddr = format!("127.0.0.3:{port}").parse().unwrap();
    client.send_to(b"hi", target).await.unwrap();
    let got = recv_batch(&server, 1, 64).await;
    let dst = got[0].0.dst_ip.expect("Linux reports the destination");
    assert_eq!(dst, "127.0.0.3".parse::<IpAddr>().unwrap());

    let reply = Transmit::new(got[0].0.peer, b"from .3").with_src_ip(Some(dst));
    let sent = poll_fn(|cx| server.poll_send(cx, std::slice::from_ref(&reply)))
        .await
        .unwrap();
    assert_eq!(sent, 1);
    let mut buf = [0u8; 64];
    let (n, from) = tokio::time::timeout(PATIENCE, client.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], b"from .3");
    assert_eq!(from, target);
}

#[tokio::test]
async fn the_kernels_drop_counter_accounts_for_what_did_not_fit_the_queue() {
    // The smallest receive buffer the kernel allows holds only a few datagrams.
    let server = bind("127.0.0.1:0", &UdpOptions::new().recv_buffer_size(1));
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let sent = 200u64;
    for i in 0..sent {
        client
            .send_to(&i.to_be_bytes(), server.local_addr().unwrap())
            .await
            .unwrap();
    }
    let mut received = drain_now(&server);
    // The kernel stamps its drop count on each datagram it queues, so the
    // drops are reported by the first datagram queued after them.
    client
        .send_to(b"last", server.local_addr().unwrap())
        .await
        .unwrap();
    received += recv_batch(&server, 1, 64).await.len() as u64;
    let drops = server.kernel_drops().expect("Linux reports drops");
    assert!(drops > 0, "received {received}, dropped {drops}");
    assert_eq!(received + drops, sent + 1);
}

/// Reads whatever is queued, without waiting.
fn drain_now(transport: &dyn Transport) -> u64 {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let mut received = 0;
    loop {
        let mut buf = [0u8; 64];
        let mut meta = [RecvMeta::default()];
        match transport.poll_recv(&mut cx, &mut [IoSliceMut::new(&mut buf)], &mut meta) {
            std::task::Poll::Ready(Ok(n)) => received += n as u64,
            std::task::Poll::Ready(Err(e)) => panic!("{e}"),
            std::task::Poll::Pending => return received,
        }
    }
}

#[tokio::test]
async fn a_group_on_port_zero_shares_the_port_the_first_socket_got() {
    let group = UdpOptions::new()
        .bind_group("127.0.0.1:0".parse().unwrap(), 3)
        .unwrap();
    let addr = group[0].local_addr().unwrap();
    assert_ne!(addr.port(), 0);
    for transport in &group {
        assert_eq!(transport.local_addr().unwrap(), addr);
    }
}

#[tokio::test]
async fn a_group_refuses_a_port_another_socket_holds_even_one_that_shares() {
    use socket2::{Domain, Socket, Type};
    // Another program's socket that would share the port.
    let holder = Socket::new(Domain::IPV4, Type::DGRAM, None).unwrap();
    holder.set_reuse_port(true).unwrap();
    holder
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    let held = holder.local_addr().unwrap().as_socket().unwrap();
    let error = UdpOptions::new().bind_group(held, 2).unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::AddrInUse);
    // Asked for explicitly, sharing works.
    let shared = UdpOptions::new()
        .share_port(true)
        .bind_group(held, 2)
        .unwrap();
    assert_eq!(shared[0].local_addr().unwrap(), held);
}

#[tokio::test]
async fn a_groups_port_is_closed_to_later_sockets_that_do_not_ask_to_share() {
    let group = UdpOptions::new()
        .bind_group("127.0.0.1:0".parse().unwrap(), 2)
        .unwrap();
    let port = group[0].local_addr().unwrap();
    let again = UdpOptions::new().bind_group(port, 1).unwrap_err();
    assert_eq!(again.kind(), std::io::ErrorKind::AddrInUse);
    assert!(std::net::UdpSocket::bind(port).is_err());
}

#[tokio::test]
async fn a_socket_that_stopped_receiving_keeps_its_queue_and_takes_nothing_new() {
    let group = UdpOptions::new()
        .bind_group("127.0.0.1:0".parse().unwrap(), 2)
        .unwrap();
    let addr = group[0].local_addr().unwrap();
    let clients: Vec<UdpSocket> =
        futures_util::future::join_all((0..40).map(|_| UdpSocket::bind("127.0.0.1:0")))
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
    for client in &clients {
        client.send_to(b"before", addr).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let queued = drain_now(&*group[0]);
    assert!(queued > 0, "the kernel spread 40 peers over both sockets");
    for client in &clients {
        client.send_to(b"before", addr).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    group[0].stop_receiving().unwrap();
    for client in &clients {
        client.send_to(b"after", addr).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        drain_now(&*group[0]),
        queued,
        "what was queued stays readable"
    );
    assert_eq!(drain_now(&*group[0]), 0, "and nothing new arrives");
    // The same peers hash to the same sockets each round.
    assert_eq!(drain_now(&*group[1]), 120 - 2 * queued);
}

#[tokio::test]
async fn a_wildcard_socket_that_stopped_receiving_counts_new_datagrams_as_kernel_drops() {
    let server = bind("0.0.0.0:0", &UdpOptions::new());
    let port = server.local_addr().unwrap().port();
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for _ in 0..5 {
        client
            .send_to(b"queued", ("127.0.0.1", port))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let drops_before = server.kernel_drops().unwrap();
    server.stop_receiving().unwrap();
    for _ in 0..7 {
        client.send_to(b"late", ("127.0.0.1", port)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(drain_now(&server), 5, "what was queued stays readable");
    assert_eq!(server.kernel_drops().unwrap() - drops_before, 7);
    // It still sends, from the address the system picks.
    let transmit = Transmit::new(client.local_addr().unwrap(), b"still here");
    poll_fn(|cx| server.poll_send(cx, std::slice::from_ref(&transmit)))
        .await
        .unwrap();
    let mut buf = [0u8; 32];
    let (n, from) = tokio::time::timeout(PATIENCE, client.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((&buf[..n], from.port()), (&b"still here"[..], port));
}

#[tokio::test]
async fn invalid_options_are_named() {
    let cases: Vec<(UdpOptions, &str)> = vec![
        (UdpOptions::new().multicast_ttl_v4(256), "multicast_ttl_v4"),
        (
            UdpOptions::new().multicast_hops_v6(1000),
            "multicast_hops_v6",
        ),
        (UdpOptions::new().recv_buffer_size(0), "recv_buffer_size"),
        (UdpOptions::new().send_buffer_size(0), "send_buffer_size"),
        (
            UdpOptions::new().bind_device("a-name-far-too-long"),
            "bind_device",
        ),
        (UdpOptions::new().bind_device(""), "bind_device"),
    ];
    for (options, field) in cases {
        assert_eq!(options.validate().unwrap_err().field, field);
        let error = UdpTransport::bind("127.0.0.1:0".parse().unwrap(), &options).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput, "{field}");
    }
}

#[tokio::test]
async fn multicast_sent_on_loopback_reaches_a_member_of_the_group() {
    use abyss_transport::MulticastV4;
    use std::net::Ipv4Addr;
    let group = Ipv4Addr::new(239, 255, 77, 1);
    let options = UdpOptions::new()
        .reuse_address(true)
        .join_multicast_v4(MulticastV4::new(group, Ipv4Addr::LOCALHOST))
        .multicast_loop_v4(true);
    let Ok(member) = UdpTransport::bind("0.0.0.0:0".parse().unwrap(), &options) else {
        eprintln!("skipped: cannot join a multicast group on loopback here");
        return;
    };
    let port = member.local_addr().unwrap().port();
    let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let sender_socket = socket2::SockRef::from(&sender);
    sender_socket
        .set_multicast_if_v4(&Ipv4Addr::LOCALHOST)
        .unwrap();
    sender_socket.set_multicast_loop_v4(true).unwrap();
    sender.send_to(b"to the group", (group, port)).unwrap();
    let got = recv_batch(&member, 1, 64).await;
    assert_eq!(got[0].1, b"to the group");
    assert_eq!(
        got[0].0.dst_ip,
        Some(IpAddr::V4(group)),
        "sent to the group address"
    );
}

#[tokio::test]
async fn a_gso_transmit_reaches_the_peer_as_separate_datagrams() {
    let sender = bind("127.0.0.1:0", &UdpOptions::new());
    if sender.max_transmit_segments() < 2 {
        eprintln!("skipped: this kernel has no UDP GSO");
        return;
    }
    let receiver = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let contents: Vec<u8> = (0..250u32).map(|i| i as u8).collect();
    let mut transmit = Transmit::new(receiver.local_addr().unwrap(), &contents);
    transmit.segment_size = Some(100);
    let sent = poll_fn(|cx| sender.poll_send(cx, std::slice::from_ref(&transmit)))
        .await
        .unwrap();
    assert_eq!(sent, 1);
    let mut buf = [0u8; 512];
    for expected in [&contents[..100], &contents[100..200], &contents[200..]] {
        let n = tokio::time::timeout(PATIENCE, receiver.recv(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..n], expected);
    }
}

#[tokio::test]
async fn a_gro_socket_takes_a_burst_in_one_buffer_with_its_stride() {
    let receiver = bind("127.0.0.1:0", &UdpOptions::new().gro(true));
    let sender = bind("127.0.0.1:0", &UdpOptions::new());
    if receiver.max_receive_segments() < 2 || sender.max_transmit_segments() < 2 {
        eprintln!("skipped: this kernel has no UDP GRO or GSO");
        return;
    }
    let contents: Vec<u8> = (0..400u32).map(|i| (i / 100) as u8).collect();
    let mut transmit = Transmit::new(receiver.local_addr().unwrap(), &contents);
    transmit.segment_size = Some(100);
    poll_fn(|cx| sender.poll_send(cx, std::slice::from_ref(&transmit)))
        .await
        .unwrap();
    let got = recv_batch(&receiver, 4, 65_535).await;
    let total: usize = got.iter().map(|(meta, _)| meta.len).sum();
    assert_eq!(got.len(), 1, "the four datagrams arrive as one buffer");
    assert_eq!(total, 400);
    for (meta, payload) in &got {
        assert_eq!(meta.stride, 100, "{meta:?}");
        for (i, segment) in payload.chunks(meta.stride).enumerate() {
            assert!(
                segment.iter().all(|b| *b == segment[0]),
                "segment {i} mixes datagrams"
            );
        }
    }
}
