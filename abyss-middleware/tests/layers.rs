//! Each layer on its own, with tower-test mocks and tokio's paused clock.

use std::net::SocketAddr;
use std::time::Duration;

use abyss_middleware::{
    ConcurrencyShedLayer, Datagram, DropReason, PeerRateLimiter, RateQuota, SizeLimitLayer,
    drop_reason,
};
use tokio_test_shim::assert_ready_ok;
use tower::{BoxError, Service, ServiceExt};
use tower_test::mock;

/// Test shims so the assertions read plainly.
mod tokio_test_shim {
    macro_rules! assert_ready_ok {
        ($e:expr) => {
            match $e {
                std::task::Poll::Ready(Ok(v)) => v,
                other => panic!(
                    "expected Ready(Ok(_)), got {:?}",
                    other.map(|r| r.map(|_| ()))
                ),
            }
        };
    }
    pub(crate) use assert_ready_ok;
}

#[derive(Debug, Clone, PartialEq)]
struct Packet {
    peer: SocketAddr,
    len: usize,
}

impl Packet {
    fn from(peer: &str, len: usize) -> Self {
        Self {
            peer: peer.parse().unwrap(),
            len,
        }
    }
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
}

fn reason(error: BoxError) -> Option<DropReason> {
    drop_reason(&*error)
}

#[tokio::test]
async fn the_size_limit_passes_the_limit_and_drops_one_byte_over_before_the_service() {
    let (mut service, mut handle) = mock::spawn_layer::<Packet, &str, _>(SizeLimitLayer::new(512));

    assert_ready_ok!(service.poll_ready());
    let over = service.call(Packet::from("192.0.2.1:1000", 513));
    assert_eq!(reason(over.await.unwrap_err()), Some(DropReason::TooLarge));

    assert_ready_ok!(service.poll_ready());
    let at = service.call(Packet::from("192.0.2.1:1000", 512));
    let (request, reply) = handle
        .next_request()
        .await
        .expect("the inner service is called");
    assert_eq!(request.len, 512, "the 513-byte datagram never reached it");
    reply.send_response("ok");
    assert_eq!(at.await.unwrap(), "ok");
}

#[tokio::test(start_paused = true)]
async fn twenty_per_second_against_ten_per_second_lets_the_burst_plus_ten_per_second_through() {
    // The original's bug: a fixed-window refill that rounds down to zero and
    // still resets the clock let 10 of 60 through in this scenario.
    let limiter = PeerRateLimiter::new(RateQuota::per_second(10).with_burst(10)).unwrap();
    let mut service = tower::ServiceBuilder::new()
        .layer(limiter.layer())
        .service_fn(|_: Packet| async { Ok::<_, BoxError>(()) });
    let mut allowed = 0;
    for _ in 0..60 {
        let result = service
            .ready()
            .await
            .unwrap()
            .call(Packet::from("192.0.2.9:4000", 32))
            .await;
        match result {
            Ok(()) => allowed += 1,
            Err(error) => assert_eq!(reason(error), Some(DropReason::RateLimited)),
        }
        tokio::time::advance(Duration::from_millis(50)).await;
    }
    // 10 at once, then one per 100 ms over the 2.95 s the 60 datagrams span.
    assert!((38..=41).contains(&allowed), "{allowed} of 60 allowed");
    let stats = limiter.stats();
    assert_eq!(stats.allowed, allowed);
    assert_eq!(stats.limited, 60 - allowed);
}

#[tokio::test(start_paused = true)]
async fn a_peer_over_its_limit_does_not_limit_another() {
    let limiter = PeerRateLimiter::new(RateQuota::per_second(1).with_burst(1)).unwrap();
    assert!(limiter.check("192.0.2.1:1".parse().unwrap()));
    assert!(
        !limiter.check("192.0.2.1:2".parse().unwrap()),
        "same IP, other port: same peer"
    );
    assert!(limiter.check("192.0.2.2:1".parse().unwrap()));
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(
        limiter.check("192.0.2.1:1".parse().unwrap()),
        "refilled after the window"
    );
}

#[tokio::test(start_paused = true)]
async fn ipv6_peers_in_one_slash_64_share_one_allowance() {
    let limiter = PeerRateLimiter::new(RateQuota::per_second(2).with_burst(2)).unwrap();
    assert!(limiter.check("[2001:db8:aa:bb::1]:53".parse().unwrap()));
    assert!(limiter.check("[2001:db8:aa:bb:ffff::2]:53".parse().unwrap()));
    assert!(
        !limiter.check("[2001:db8:aa:bb:1234:5678:9abc:def0]:53".parse().unwrap()),
        "a third address in the same /64 is over the shared burst"
    );
    assert!(
        limiter.check("[2001:db8:aa:cc::1]:53".parse().unwrap()),
        "another /64"
    );
    assert_eq!(limiter.stats().tracked_peers, 2);
}

#[tokio::test(start_paused = true)]
async fn a_hundred_thousand_sources_never_grow_the_table_past_its_cap() {
    let limiter = PeerRateLimiter::builder(RateQuota::per_second(10))
        .max_tracked_peers(10_000)
        .build()
        .unwrap();
    let mut allowed = 0u64;
    for i in 0..100_000u32 {
        let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i);
        if limiter.check(SocketAddr::from((ip, 53))) {
            allowed += 1;
        }
        if i % 10_000 == 0 {
            assert!(limiter.stats().tracked_peers <= 10_000);
        }
    }
    let stats = limiter.stats();
    assert!(stats.tracked_peers <= 10_000, "{stats:?}");
    assert_eq!(stats.tracked_peers, 10_000, "the table fills up to its cap");
    // Newcomers beyond the cap share the overflow allowance of their shard
    // (at most 64 shards, a burst of 10 each): they are limited as a group,
    // not let through unchecked.
    assert!(allowed <= 10_000 + 64 * 10, "{allowed} allowed");
    assert_eq!(stats.allowed + stats.limited, 100_000);
}

#[tokio::test(start_paused = true)]
async fn idle_peers_are_evicted_to_make_room_for_new_ones() {
    let limiter = PeerRateLimiter::builder(RateQuota::per_second(10))
        .max_tracked_peers(100)
        .build()
        .unwrap();
    for i in 0..100u8 {
        assert!(limiter.check(SocketAddr::from(([10, 0, 0, i], 1))));
    }
    assert_eq!(limiter.stats().tracked_peers, 100);
    // Once their allowance has refilled, the old peers carry no state.
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(limiter.check(SocketAddr::from(([10, 0, 1, 1], 1))));
    let stats = limiter.stats();
    assert!(stats.evicted > 0, "{stats:?}");
    assert!(stats.tracked_peers <= 100);
    limiter.evict_idle();
    tokio::time::advance(Duration::from_secs(1)).await;
    limiter.evict_idle();
    assert_eq!(limiter.stats().tracked_peers, 0);
}

#[tokio::test(start_paused = true)]
async fn the_quota_can_be_changed_while_serving() {
    let limiter = PeerRateLimiter::new(RateQuota::per_second(1).with_burst(1)).unwrap();
    let mut service = tower::ServiceBuilder::new()
        .layer(limiter.layer())
        .service_fn(|_: Packet| async { Ok::<_, BoxError>(()) });
    let peer = "192.0.2.1:1";
    assert!(
        service
            .ready()
            .await
            .unwrap()
            .call(Packet::from(peer, 1))
            .await
            .is_ok()
    );
    assert!(
        service
            .ready()
            .await
            .unwrap()
            .call(Packet::from(peer, 1))
            .await
            .is_err()
    );

    limiter
        .set_quota(RateQuota::per_second(100).with_burst(100))
        .unwrap();
    assert_eq!(limiter.quota(), RateQuota::per_second(100));
    for _ in 0..50 {
        assert!(
            service
                .ready()
                .await
                .unwrap()
                .call(Packet::from(peer, 1))
                .await
                .is_ok()
        );
    }
    assert_eq!(
        limiter
            .set_quota(RateQuota::per_second(0))
            .unwrap_err()
            .field,
        "max",
        "an invalid quota is refused and the old one kept"
    );
    assert_eq!(limiter.quota(), RateQuota::per_second(100));
}

#[tokio::test]
async fn invalid_rate_limit_options_are_named() {
    let error = PeerRateLimiter::builder(RateQuota::per_second(1))
        .max_tracked_peers(0)
        .build()
        .unwrap_err();
    assert_eq!(error.field, "max_tracked_peers");
    let error = PeerRateLimiter::builder(RateQuota::per_second(1))
        .prefixes(33, 64)
        .build()
        .unwrap_err();
    assert_eq!(error.field, "prefix_v4");
    let error = PeerRateLimiter::builder(RateQuota::per_second(1))
        .prefixes(32, 129)
        .build()
        .unwrap_err();
    assert_eq!(error.field, "prefix_v6");
    assert!(error.to_string().contains("prefix_v6"));
}

#[tokio::test(start_paused = true)]
async fn a_custom_key_function_decides_who_is_one_peer() {
    let limiter = PeerRateLimiter::builder(RateQuota::per_second(1))
        .with_key(|peer: SocketAddr| peer.port())
        .build()
        .unwrap();
    assert!(limiter.check("127.0.0.1:5000".parse().unwrap()));
    assert!(
        !limiter.check("127.0.0.2:5000".parse().unwrap()),
        "same port, same key"
    );
    assert!(limiter.check("127.0.0.1:5001".parse().unwrap()));
}

#[tokio::test]
async fn the_concurrency_limit_drops_instead_of_waiting_and_frees_slots_on_completion() {
    let (mut service, mut handle) =
        mock::spawn_layer::<Packet, &str, _>(ConcurrencyShedLayer::new(2));

    assert_ready_ok!(service.poll_ready());
    let first = service.call(Packet::from("192.0.2.1:1", 1));
    assert_ready_ok!(service.poll_ready());
    let second = service.call(Packet::from("192.0.2.1:1", 2));
    // Still ready: a third request is not made to wait, it is dropped.
    assert_ready_ok!(service.poll_ready());
    let third = service.call(Packet::from("192.0.2.1:1", 3));
    assert_eq!(
        reason(third.await.unwrap_err()),
        Some(DropReason::Overloaded)
    );

    let (_, reply) = handle.next_request().await.unwrap();
    reply.send_response("one");
    assert_eq!(first.await.unwrap(), "one");
    // A slot is free again; dropping an unfinished future frees one too.
    drop(second);
    for n in 4..6 {
        assert_ready_ok!(service.poll_ready());
        let _pending = service.call(Packet::from("192.0.2.1:1", n));
        std::mem::forget(_pending);
    }
    assert_ready_ok!(service.poll_ready());
    let over = service.call(Packet::from("192.0.2.1:1", 6));
    assert_eq!(
        reason(over.await.unwrap_err()),
        Some(DropReason::Overloaded)
    );
}

#[tokio::test(start_paused = true)]
async fn towers_timeout_is_counted_as_timed_out() {
    let mut service = tower::ServiceBuilder::new()
        .timeout(Duration::from_millis(100))
        .service_fn(|_: Packet| async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok::<_, BoxError>(())
        });
    let error = service
        .ready()
        .await
        .unwrap()
        .call(Packet::from("192.0.2.1:1", 1))
        .await
        .unwrap_err();
    assert_eq!(reason(error), Some(DropReason::TimedOut));
}

#[tokio::test]
async fn the_ip_filter_denies_before_it_allows_and_matches_mapped_ipv4() {
    use abyss_middleware::IpFilterLayer;
    let filter = IpFilterLayer::new()
        .allow("192.0.2.0/24".parse().unwrap())
        .allow("2001:db8::/32".parse().unwrap())
        .deny("192.0.2.128/25".parse().unwrap());
    let mut service = tower::ServiceBuilder::new()
        .layer(filter)
        .service_fn(|_: Packet| async { Ok::<_, BoxError>(()) });
    for (peer, admitted) in [
        ("192.0.2.1:53", true),
        ("[::ffff:192.0.2.1]:53", true),
        ("192.0.2.200:53", false),
        ("[2001:db8::1]:53", true),
        ("198.51.100.1:53", false),
    ] {
        let result = service
            .ready()
            .await
            .unwrap()
            .call(Packet::from(peer, 1))
            .await;
        match result {
            Ok(()) => assert!(admitted, "{peer} should have been denied"),
            Err(error) => {
                assert!(!admitted, "{peer} should have been admitted");
                assert_eq!(reason(error), Some(DropReason::Denied));
            }
        }
    }
}

#[tokio::test]
async fn replies_over_three_times_the_request_to_unvalidated_peers_are_dropped() {
    use abyss_middleware::AmplificationGuardLayer;
    use bytes::Bytes;
    let trusted: std::net::IpAddr = "192.0.2.10".parse().unwrap();
    let mut service = tower::ServiceBuilder::new()
        .layer(
            AmplificationGuardLayer::default()
                .validated_by(move |peer: SocketAddr| peer.ip() == trusted),
        )
        // Replies three times the request, one byte more to peers on port 1.
        .service_fn(|packet: Packet| async move {
            Ok::<_, BoxError>(Some(Bytes::from(vec![
                0u8;
                packet.len * 3
                    + usize::from(
                        packet.peer.port() == 1
                    )
            ])))
        });
    let at_limit = service
        .ready()
        .await
        .unwrap()
        .call(Packet::from("192.0.2.1:2", 10))
        .await;
    assert_eq!(at_limit.unwrap().unwrap().len(), 30, "exactly 3x passes");
    let over = service
        .ready()
        .await
        .unwrap()
        .call(Packet::from("192.0.2.1:1", 10))
        .await;
    assert_eq!(
        reason(over.unwrap_err()),
        Some(DropReason::Amplification),
        "31 bytes for 10 is over"
    );
    let validated = service
        .ready()
        .await
        .unwrap()
        .call(Packet::from("192.0.2.10:1", 10))
        .await;
    assert_eq!(
        validated.unwrap().unwrap().len(),
        31,
        "a validated peer is not capped"
    );
}

#[test]
fn adding_a_block_to_a_cloned_filter_leaves_the_original_as_it_was() {
    use abyss_middleware::IpFilterLayer;
    let open = IpFilterLayer::new();
    let closed = open.clone().deny("0.0.0.0/0".parse().unwrap());
    let peer = "192.0.2.1:53".parse().unwrap();
    assert!(open.admits(peer));
    assert!(!closed.admits(peer));
}

#[tokio::test]
async fn every_service_gives_access_to_the_service_it_wraps() {
    use abyss_middleware::{AmplificationGuardLayer, IpFilterLayer, TraceLayer};
    use tower::Layer;

    /// Checks `get_ref`, `get_mut` and `into_inner` of one service made by
    /// `layer` around a `Vec`.
    macro_rules! check {
        ($layer:expr) => {{
            let mut service = $layer.layer(vec![1]);
            assert_eq!(service.get_ref(), &[1]);
            service.get_mut().push(2);
            assert_eq!(service.get_ref(), &[1, 2]);
            assert_eq!(service.into_inner(), vec![1, 2]);
        }};
    }

    let limiter = PeerRateLimiter::new(RateQuota::per_second(1)).unwrap();
    check!(SizeLimitLayer::new(1));
    check!(ConcurrencyShedLayer::new(1));
    check!(limiter.layer());
    check!(TraceLayer::new());
    check!(IpFilterLayer::new());
    check!(AmplificationGuardLayer::new(3));
}

#[test]
fn a_rate_limit_error_names_the_part_at_fault() {
    let error = PeerRateLimiter::new(RateQuota::per_second(10).with_burst(0)).unwrap_err();
    assert_eq!(error.field, "burst");
    assert_eq!(error.reason, "must be at least 1");
    assert_eq!(
        error.to_string(),
        "invalid rate limit `burst`: must be at least 1"
    );
    let error = PeerRateLimiter::builder(RateQuota::per_second(10))
        .max_tracked_peers(0)
        .build()
        .unwrap_err();
    assert_eq!(error.field, "max_tracked_peers");
}

#[tokio::test(start_paused = true)]
async fn a_new_peer_takes_an_idle_peers_place_and_every_peer_keeps_its_own_state() {
    let quota = RateQuota::per_second(1).with_burst(1);
    let limiter = PeerRateLimiter::builder(quota)
        .max_tracked_peers(8)
        .build()
        .unwrap();
    let peer = |i: u8| SocketAddr::from(([10, 0, 0, i], 1));
    for i in 0..8 {
        assert!(limiter.check(peer(i)));
    }
    tokio::time::advance(Duration::from_millis(500)).await;
    // Peers 0 to 3 spend their allowance again later: only 4 to 7 go idle.
    tokio::time::advance(Duration::from_millis(600)).await;
    for i in 0..4 {
        assert!(limiter.check(peer(i)));
    }
    // Four newcomers take the four idle places, one each.
    for i in 100..104 {
        assert!(limiter.check(peer(i)), "peer {i} finds an idle place");
    }
    let stats = limiter.stats();
    assert_eq!((stats.tracked_peers, stats.evicted), (8, 4), "{stats:?}");
    // Every tracked peer's state is its own: all have spent their
    // allowance, so each is limited now.
    for i in (0..4).chain(100..104) {
        assert!(
            !limiter.check(peer(i)),
            "peer {i} is limited by its own state"
        );
    }
    // A fifth newcomer finds no idle place: it shares the overflow
    // allowance, and the tracked peers keep theirs.
    assert!(limiter.check(peer(200)));
    assert!(!limiter.check(peer(201)), "the overflow allowance is spent");
    assert_eq!(limiter.stats().tracked_peers, 8);
}

#[tokio::test(start_paused = true)]
async fn a_reply_budget_withholds_replies_over_it_and_spares_exempt_peers() {
    use abyss_middleware::{DropReason, ReplyBudget, drop_reason};

    let budget = ReplyBudget::builder()
        .replies_per_second(3)
        .bytes_per_second(100)
        .exempt(|peer: SocketAddr| peer.port() == 53)
        .build()
        .unwrap();
    // Replies with the size asked for in the payload length; 0 means none.
    let mut service = tower::ServiceBuilder::new()
        .layer(budget.layer())
        .service_fn(|packet: Packet| async move {
            Ok::<_, BoxError>((packet.len > 0).then(|| vec![0u8; packet.len]))
        });
    let mut ask = async |peer: &str, len: usize| {
        service
            .ready()
            .await
            .unwrap()
            .call(Packet::from(peer, len))
            .await
            .map_err(|e| drop_reason(&*e))
    };
    // Three replies a second; no reply spends nothing.
    for _ in 0..3 {
        assert!(ask("192.0.2.1:1000", 10).await.is_ok());
    }
    assert!(ask("192.0.2.1:1000", 0).await.is_ok());
    assert_eq!(
        ask("192.0.2.2:1000", 10).await,
        Err(Some(DropReason::OverBudget))
    );
    // An exempt peer is answered regardless, and spends nothing.
    for _ in 0..10 {
        assert!(ask("192.0.2.3:53", 1000).await.is_ok());
    }
    // A second refills it; a reply over the bytes budget is withheld.
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(
        ask("192.0.2.1:1000", 101).await,
        Err(Some(DropReason::OverBudget))
    );
    assert!(ask("192.0.2.1:1000", 100).await.is_ok());
    assert_eq!(
        ask("192.0.2.1:1000", 1).await,
        Err(Some(DropReason::OverBudget)),
        "the bytes are spent"
    );
    let stats = budget.stats();
    assert_eq!(
        (stats.sent, stats.exempted, stats.over_budget),
        (4, 10, 3),
        "{stats:?}"
    );
}

/// DNS-like classes for the RRL tests: the reply's first byte is its kind.
struct ByFirstByte;

impl abyss_middleware::rrl::Classify for ByFirstByte {
    type Class = u8;

    fn classify(&self, reply: &[u8]) -> Option<u8> {
        reply.first().copied()
    }

    fn slip(&self, _reply: &[u8]) -> Option<bytes::Bytes> {
        Some(bytes::Bytes::from_static(b"TC"))
    }
}

#[tokio::test(start_paused = true)]
async fn response_rate_limiting_holds_a_flooding_network_in_debt_for_its_window() {
    use abyss_middleware::rrl::ResponseRateLimit;
    use bytes::Bytes;

    let rrl = ResponseRateLimit::builder(ByFirstByte, 5).build().unwrap();
    let victim: SocketAddr = "198.51.100.7:53".parse().unwrap();
    let answer = Bytes::from_static(b"A answer");
    let (mut sent, mut slipped, mut dropped) = (0, 0, 0);
    // 100 identical answers a second for 3 s to one /24.
    for _ in 0..300 {
        match rrl.decide(victim, answer.clone()) {
            Ok(reply) if reply == answer => sent += 1,
            Ok(_) => slipped += 1,
            Err(_) => dropped += 1,
        }
        tokio::time::advance(Duration::from_millis(10)).await;
    }
    // One second of credit, then nothing: the flood's own responses keep
    // the account in debt (as BIND's do), up to the 15 s window.
    assert_eq!(sent, 5);
    assert_eq!(
        (slipped, dropped),
        (147, 148),
        "every second limited one slips"
    );
    // Another kind of answer, and another network, are not held back.
    assert!(matches!(rrl.decide(victim, Bytes::from_static(b"B other")), Ok(r) if r[0] == b'B'));
    let neighbour: SocketAddr = "198.51.101.7:53".parse().unwrap();
    assert_eq!(rrl.decide(neighbour, answer.clone()), Ok(answer.clone()));
    // Ten quiet seconds are not enough to pay a 15 s debt...
    tokio::time::advance(Duration::from_secs(10)).await;
    assert!(!matches!(rrl.decide(victim, answer.clone()), Ok(r) if r == answer));
    // ...sixteen are.
    tokio::time::advance(Duration::from_secs(16)).await;
    assert_eq!(rrl.decide(victim, answer.clone()), Ok(answer.clone()));
    let stats = rrl.stats();
    assert_eq!(stats.sent, 5 + 1 + 1 + 1);
    assert_eq!(stats.limited(), 295 + 1);
}

#[tokio::test(start_paused = true)]
async fn response_rate_limiting_spares_exempt_peers_and_drops_through_the_layer() {
    use abyss_middleware::rrl::ResponseRateLimit;
    use abyss_middleware::{DropReason, drop_reason};

    let rrl = ResponseRateLimit::builder(ByFirstByte, 1)
        .slip(0)
        .exempt(|peer: SocketAddr| peer.port() == 53)
        .build()
        .unwrap();
    let mut service = tower::ServiceBuilder::new()
        .layer(rrl.layer())
        .service_fn(|_: Packet| async { Ok::<_, BoxError>(bytes::Bytes::from_static(b"A")) });
    let mut ask = async |peer: &str| {
        service
            .ready()
            .await
            .unwrap()
            .call(Packet::from(peer, 1))
            .await
            .map_err(|e| drop_reason(&*e))
    };
    assert!(ask("192.0.2.1:1000").await.is_ok());
    assert_eq!(
        ask("192.0.2.2:1000").await,
        Err(Some(DropReason::RateLimited)),
        "same /24"
    );
    for _ in 0..10 {
        assert!(ask("192.0.2.3:53").await.is_ok(), "exempt");
    }
    let stats = rrl.stats();
    assert_eq!(
        (stats.sent, stats.dropped, stats.slipped, stats.unlimited),
        (1, 1, 0, 10)
    );
}

#[tokio::test(start_paused = true)]
async fn response_rate_limiting_keeps_the_tos_the_service_asked_for() {
    use abyss_middleware::rrl::ResponseRateLimit;
    use abyss_middleware::{IntoReply, Reply};

    let rrl = ResponseRateLimit::builder(ByFirstByte, 5).build().unwrap();
    let mut service =
        tower::ServiceBuilder::new()
            .layer(rrl.layer())
            .service_fn(|_: Packet| async {
                Ok::<_, BoxError>(Reply::new(bytes::Bytes::from_static(b"A")).with_tos(46 << 2))
            });
    let reply = service
        .ready()
        .await
        .unwrap()
        .call(Packet::from("192.0.2.1:1000", 1))
        .await
        .unwrap();
    assert_eq!(reply.tos(), Some(46 << 2), "EF kept: {reply:?}");
    assert_eq!(reply.into_reply().as_deref(), Some(&b"A"[..]));
}

#[tokio::test(start_paused = true)]
async fn a_reply_the_budget_refuses_spends_none_of_it() {
    use abyss_middleware::ReplyBudget;

    let budget = ReplyBudget::builder()
        .replies_per_second(2)
        .bytes_per_second(1000)
        .build()
        .unwrap();
    let peer: SocketAddr = "192.0.2.1:1000".parse().unwrap();
    assert!(budget.spend(peer, 100));
    assert!(budget.spend(peer, 100));
    // No reply left this second: refused, and its 800 bytes not spent.
    assert!(!budget.spend(peer, 800));
    tokio::time::advance(Duration::from_millis(500)).await;
    // Half a second later, one reply is back and 700 bytes are free.
    assert!(budget.spend(peer, 600), "the refused reply spent nothing");
    let stats = budget.stats();
    assert_eq!((stats.sent, stats.over_budget), (3, 1), "{stats:?}");
}

#[tokio::test(start_paused = true)]
async fn each_limited_account_slips_its_own_share() {
    use abyss_middleware::rrl::ResponseRateLimit;
    use bytes::Bytes;

    let rrl = ResponseRateLimit::builder(ByFirstByte, 1).build().unwrap();
    let (v, w): (SocketAddr, SocketAddr) = (
        "198.51.100.7:53".parse().unwrap(),
        "203.0.113.7:53".parse().unwrap(),
    );
    let answer = Bytes::from_static(b"A answer");
    let mut slipped = [0, 0];
    // Two flooded networks, their responses interleaved.
    for _ in 0..21 {
        for (i, peer) in [v, w].into_iter().enumerate() {
            if let Ok(reply) = rrl.decide(peer, answer.clone())
                && reply != answer
            {
                slipped[i] += 1;
            }
        }
    }
    // One sent each, then 20 limited each: every second one slips.
    assert_eq!(slipped, [10, 10]);
}
