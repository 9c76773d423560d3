//! Reliability suites: floods, faults, bad input, and the accounting
//! invariant under all of them. Each prints one line of figures
//! (`reliability: ...`) that RELIABILITY.md collects.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use abyss::middleware::RateQuota;
use abyss::session::{Session, Sessions, Step};
use abyss::{Request, Server, ServerHandle, Stats};
use abyss_tests::{PATIENCE, assert_accounted, client, echo, recv_within, settled, wait_for_stats};
use tokio::net::UdpSocket;
use tower::service_fn;

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn report(name: &str, load: &str, faults: &str, stats: &Stats, unaccounted: i64) {
    println!(
        "reliability: {name} | {load} | {faults} | received={} replied={} no_reply={} dropped={} in_flight={} kernel_drops={} | unaccounted={unaccounted}",
        stats.received,
        stats.replied,
        stats.no_reply,
        stats.dropped.total(),
        stats.in_flight,
        stats.kernel_drops.unwrap_or(0)
    );
}

/// Sends `per_socket` datagrams from each of `sockets` sockets with `window`
/// in flight, counting replies; returns (sent, replies counted by clients).
async fn blast(server: SocketAddr, sockets: usize, per_socket: usize, window: usize) -> (u64, u64) {
    let replies = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..sockets {
        let replies = replies.clone();
        tasks.spawn(async move {
            let socket = client().await;
            let mut buf = [0u8; 2048];
            let mut sent = 0usize;
            let mut outstanding = 0usize;
            while sent < per_socket || outstanding > 0 {
                while sent < per_socket && outstanding < window {
                    socket
                        .send_to(&(sent as u64).to_be_bytes(), server)
                        .await
                        .unwrap();
                    sent += 1;
                    outstanding += 1;
                }
                // A lost or unanswered datagram frees its slot after a while.
                match tokio::time::timeout(Duration::from_millis(200), socket.recv_from(&mut buf))
                    .await
                {
                    Ok(Ok(_)) => {
                        replies.fetch_add(1, Ordering::Relaxed);
                        outstanding -= 1;
                    }
                    _ => outstanding = 0,
                }
            }
        });
    }
    while let Some(result) = tasks.join_next().await {
        result.unwrap();
    }
    (
        (sockets * per_socket) as u64,
        replies.load(Ordering::Relaxed),
    )
}

/// Checks the invariant on snapshots taken while `work` runs.
async fn watch_accounting<T>(handle: &ServerHandle, work: impl Future<Output = T>) -> (T, usize) {
    let mut snapshots = 0;
    tokio::pin!(work);
    loop {
        tokio::select! {
            out = &mut work => return (out, snapshots),
            () = tokio::time::sleep(Duration::from_millis(5)) => {
                assert_accounted(&handle.stats());
                snapshots += 1;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_datagram_from_64_sockets_is_accounted_for_at_every_snapshot() {
    let handle = Server::bind(loopback())
        .listeners(2)
        .serve(echo())
        .await
        .unwrap();
    // ABYSS_SOAK_DATAGRAMS=1000000 runs the full soak (about 30 s in a debug
    // build here); CI runs 64 000.
    let total: usize = std::env::var("ABYSS_SOAK_DATAGRAMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64_000);
    let ((sent, client_replies), snapshots) = watch_accounting(
        &handle,
        blast(handle.local_addr(), 64, total.div_ceil(64), 8),
    )
    .await;
    let stats = settled(&handle).await;
    assert_accounted(&stats);
    assert_eq!(
        stats.replied, client_replies,
        "every reply counted was received, and only those"
    );
    let kernel = stats.kernel_drops.unwrap_or(0);
    assert_eq!(
        stats.received + kernel,
        sent,
        "what was sent was received or dropped by the kernel"
    );
    report(
        "accounting",
        &format!("{sent} datagrams from 64 sockets, {snapshots} snapshots"),
        "none",
        &stats,
        sent as i64 - (stats.received + kernel) as i64,
    );
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panics_and_errors_on_a_tenth_of_datagrams_are_counted_exactly() {
    let handle = Server::bind(loopback())
        .listeners(2)
        .serve(service_fn(|request: Request| async move {
            let n = u64::from_be_bytes(request.payload()[..8].try_into().unwrap());
            match n % 10 {
                3 => panic!("a tenth of requests panic"),
                7 => Err(std::io::Error::other("a tenth of requests fail")),
                _ => Ok(request.into_payload()),
            }
        }))
        .await
        .unwrap();
    let (sent, client_replies) = blast(handle.local_addr(), 16, 500, 8).await;
    let stats = settled(&handle).await;
    assert_accounted(&stats);
    let received = stats.received;
    // Each socket sends 0..500: 50 of each residue.
    assert_eq!(received, sent, "loopback at this pace loses nothing");
    assert_eq!(stats.dropped.panicked, 16 * 50);
    assert_eq!(stats.dropped.handler_error, 16 * 50);
    assert_eq!(stats.replied, 16 * 400);
    assert_eq!(client_replies, stats.replied);
    // The listeners are alive: a new peer is served.
    let socket = client().await;
    socket
        .send_to(&0u64.to_be_bytes(), handle.local_addr())
        .await
        .unwrap();
    assert!(recv_within(&socket, PATIENCE).await.is_some());
    report(
        "handler panics and errors",
        &format!("{sent} datagrams, 16 sockets"),
        "10% panic, 10% error",
        &stats,
        0,
    );
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_handler_under_load_stays_within_its_cap_and_recovers() {
    let handle = Server::bind(loopback())
        .listeners(1)
        .max_in_flight(64)
        .serve(service_fn(|request: Request| async move {
            if request.payload().as_ref() != b"quick" {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok::<_, Infallible>(request.into_payload())
        }))
        .await
        .unwrap();
    let server = handle.local_addr();
    let flood = tokio::spawn(async move {
        let socket = client().await;
        for i in 0..5_000u64 {
            let _ = socket.send_to(&i.to_be_bytes(), server).await;
        }
    });
    let (result, snapshots) = watch_accounting(&handle, async {
        let mut most = 0;
        while !flood.is_finished() {
            most = most.max(handle.stats().in_flight);
            tokio::task::yield_now().await;
        }
        most
    })
    .await;
    assert!(
        result <= 64,
        "in flight peaked at {result}, over the cap of 64"
    );
    let stats = settled(&handle).await;
    assert_accounted(&stats);
    let kernel = stats.kernel_drops.unwrap_or(0);
    assert_eq!(
        stats.received + kernel,
        5_000,
        "what the server did not take, the kernel dropped and counted"
    );
    // Normal service once the load stops.
    let socket = client().await;
    socket.send_to(b"quick", server).await.unwrap();
    assert_eq!(recv_within(&socket, PATIENCE).await.unwrap().0, b"quick");
    report(
        "slow handler",
        &format!("5000 datagrams at once, 100 ms each, cap 64, {snapshots} snapshots"),
        "slowness",
        &stats,
        5_000 - (stats.received + kernel) as i64,
    );
    println!(
        "reliability-detail: slow handler: peak in flight {result}, reads paused {}, kernel drops {:?}",
        stats.reads_paused, stats.kernel_drops
    );
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_under_load_answers_or_aborts_every_accepted_request() {
    let handle = Server::bind(loopback())
        .listeners(2)
        .shutdown_timeout(Duration::from_millis(300))
        .serve(service_fn(|request: Request| async move {
            let n = u64::from_be_bytes(request.payload()[..8].try_into().unwrap());
            // Some finish quickly, some outlive the deadline.
            tokio::time::sleep(Duration::from_millis(if n % 4 == 0 { 10_000 } else { 20 })).await;
            Ok::<_, Infallible>(request.into_payload())
        }))
        .await
        .unwrap();
    let server = handle.local_addr();
    let load = tokio::spawn(blast(server, 8, 200, 16));
    wait_for_stats(&handle, "load under way", |s| s.received >= 200).await;
    let report_ = handle.shutdown().await;
    let stats = handle.stats();
    assert_accounted(&stats);
    assert_eq!(stats.in_flight, 0, "nothing left in flight after shutdown");
    assert_eq!(report_.aborted, stats.dropped.aborted);
    assert!(
        report_.aborted > 0,
        "the slow quarter outlived the deadline"
    );
    let _ = load.await;
    report(
        "graceful shutdown under load",
        "8 sockets x 16 in flight, a quarter of requests take 10 s",
        "shutdown with a 300 ms deadline",
        &stats,
        stats.received as i64 - (stats.replied + stats.no_reply + stats.dropped.total()) as i64,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_to_vanished_peers_are_counted_and_the_listener_lives() {
    let handle = Server::bind(loopback())
        .listeners(1)
        .serve(service_fn(|request: Request| async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok::<_, Infallible>(request.into_payload())
        }))
        .await
        .unwrap();
    // Each peer sends and closes at once: the replies meet closed ports and
    // the kernel answers with ICMP port unreachable.
    for i in 0..200u64 {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .send_to(&i.to_be_bytes(), handle.local_addr())
            .unwrap();
    }
    let stats = wait_for_stats(&handle, "200 handled", |s| {
        s.received == 200 && s.in_flight == 0
    })
    .await;
    assert_accounted(&stats);
    let socket = client().await;
    socket
        .send_to(b"alive?", handle.local_addr())
        .await
        .unwrap();
    assert_eq!(recv_within(&socket, PATIENCE).await.unwrap().0, b"alive?");
    report(
        "send faults",
        "200 peers gone before their reply",
        "ICMP port unreachable",
        &stats,
        0,
    );
    handle.shutdown().await;
}

/// Holds a peer's session until told to close.
struct Held;

impl Session for Held {
    async fn handle(&mut self, _request: Request) -> Step {
        Step::keep()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_65000_spoofed_sources_keeps_tables_and_memory_bounded() {
    let sessions = Sessions::builder(|_| Held)
        .max_sessions(1_000)
        .build()
        .unwrap();
    let limiter = abyss::middleware::PeerRateLimiter::builder(RateQuota::per_second(10))
        .max_tracked_peers(10_000)
        .build()
        .unwrap();
    let handle = Server::bind("0.0.0.0:0")
        .listeners(2)
        .rate_limiter(limiter.clone())
        .serve(sessions.service())
        .await
        .unwrap();
    let port = handle.local_addr().port();
    let rss_before = rss_kib();
    let sent = tokio::task::spawn_blocking(move || {
        let target = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut sent = 0u64;
        // 127.1.0.0 to 127.1.253.231: 65 000 distinct sources.
        for i in 0..65_000u32 {
            let source = Ipv4Addr::from(0x7f01_0000 + i);
            let Ok(socket) = std::net::UdpSocket::bind((source, 0)) else {
                continue;
            };
            if socket.send_to(b"hello", target).is_ok() {
                sent += 1;
            }
        }
        sent
    })
    .await
    .unwrap();
    let stats = wait_for_stats(&handle, "the flood handled", |s| {
        s.received + s.kernel_drops.unwrap_or(0) >= sent && s.in_flight == 0
    })
    .await;
    let rss_after = rss_kib();
    assert_accounted(&stats);
    let rl = limiter.stats();
    let ss = sessions.stats();
    assert!(rl.tracked_peers <= 10_000, "{rl:?}");
    assert!(ss.live <= 1_000, "{ss:?}");
    assert_eq!(ss.created, 1_000, "sessions stop at their cap");
    let growth = rss_after.saturating_sub(rss_before);
    assert!(growth < 128 * 1024, "RSS grew by {growth} KiB");
    report(
        "spoofed-source flood",
        &format!("{sent} datagrams from 65000 sources, rate limit and sessions on"),
        "distinct sources",
        &stats,
        sent as i64 - (stats.received + stats.kernel_drops.unwrap_or(0)) as i64,
    );
    println!(
        "reliability-detail: flood: tracked peers {} (cap 10000), live sessions {} (cap 1000), refused {}, RSS growth {growth} KiB",
        rl.tracked_peers, ss.live, ss.refused
    );
    handle.shutdown().await;
}

/// Counts a peer's datagrams, and says the count.
struct Tally(u64);

impl Session for Tally {
    async fn handle(&mut self, _request: Request) -> Step {
        self.0 += 1;
        Step::keep().reply(self.0.to_string())
    }
}

/// Sends one datagram from each of `ports` on `source` to `target`, from a
/// socket bound for it and closed at once (a port in use is skipped);
/// returns how many were sent.
fn spray(source: Ipv4Addr, ports: std::ops::Range<u16>, target: SocketAddr) -> u64 {
    let mut sent = 0;
    for port in ports {
        let Ok(socket) = std::net::UdpSocket::bind((source, port)) else {
            continue;
        };
        if socket.send_to(b"hello", target).is_ok() {
            sent += 1;
        }
    }
    sent
}

/// Asks until answered (a datagram may be lost); the time to the answer.
async fn time_to_answer(source: Ipv4Addr, server: SocketAddr) -> Duration {
    let socket = UdpSocket::bind((source, 0)).await.unwrap();
    let start = tokio::time::Instant::now();
    let mut buf = [0u8; 64];
    loop {
        socket.send_to(b"hello", server).await.unwrap();
        if let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_millis(100), socket.recv_from(&mut buf)).await
        {
            assert_eq!(&buf[..n], b"1", "a session of its own");
            return start.elapsed();
        }
        assert!(start.elapsed() < PATIENCE, "a new peer was never answered");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_peers_are_answered_while_floods_from_many_ports_hold_the_sessions() {
    // The defaults: 16 384 sessions, 1 024 per source, idle for 60 s.
    let sessions = Sessions::builder(|_| Tally(0)).build().unwrap();
    let handle = Server::bind("0.0.0.0:0")
        .serve(sessions.service())
        .await
        .unwrap();
    let server = SocketAddr::from((Ipv4Addr::LOCALHOST, handle.local_addr().port()));
    let mut sent = 0;
    // In bursts of 128, each handled before the next: the socket's
    // receive buffer holds a few hundred datagrams, and the point is the
    // sessions they start, not the kernel's drops.
    let mut flood = async |sources: std::ops::RangeInclusive<u8>, ports: std::ops::Range<u16>| {
        let mut total = 0;
        for last in sources {
            for start in ports.clone().step_by(128) {
                let burst = start..(start + 128).min(ports.end);
                let source = Ipv4Addr::new(127, 0, 0, last);
                let burst_sent = tokio::task::spawn_blocking(move || spray(source, burst, server))
                    .await
                    .unwrap();
                total += burst_sent;
                sent += burst_sent;
                let stats = wait_for_stats(&handle, "the flood handled", |s| {
                    s.received + s.kernel_drops.unwrap_or(0) >= sent && s.in_flight == 0
                })
                .await;
                assert_accounted(&stats);
            }
        }
        total
    };

    // One host sends from 17 000 ports: it gets its share, no more.
    let one_host = flood(1..=1, 40_000..57_000).await;
    let first = time_to_answer(Ipv4Addr::new(127, 0, 0, 200), server).await;
    let after_one = sessions.stats();
    assert!(after_one.live <= 1_024 + 1, "{after_one:?}");
    assert!(after_one.refused_per_source > 0, "{after_one:?}");

    // Sixteen more hosts, 1 000 ports each, fill the table: a newcomer
    // takes the place of the quietest session of the heaviest host.
    let many_hosts = flood(2..=17, 40_000..41_000).await;
    let full = sessions.stats();
    assert_eq!(full.live, 16_384, "the table is full: {full:?}");
    let second = time_to_answer(Ipv4Addr::new(127, 0, 0, 201), server).await;
    let after = sessions.stats();
    assert!(after.evicted >= 1, "{after:?}");
    assert_eq!(after.live, 16_384, "{after:?}");

    println!(
        "reliability: session floods | {one_host} ports from 1 host, then {many_hosts} from 16 hosts | full session table | new peer answered in {:.1} ms, then in {:.1} ms (table full) | live={} refused={} refused_per_source={} evicted={}",
        first.as_secs_f64() * 1e3,
        second.as_secs_f64() * 1e3,
        after.live,
        after.refused,
        after.refused_per_source,
        after.evicted,
    );
    handle.shutdown().await;
}

/// A raw IPv4 socket that writes its own headers: sends UDP datagrams
/// from any source address (loopback routes all of 127/8 to this host).
/// `None` without the privilege (root or `CAP_NET_RAW`).
fn spoofer() -> Option<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::UDP)).ok()?;
    socket.set_header_included_v4(true).ok()?;
    Some(socket)
}

/// An IPv4 + UDP packet from `source` to `target` carrying `payload`. The
/// kernel fills in the IP checksum and length; UDP over IPv4 may leave
/// its checksum zero.
fn spoofed(source: SocketAddr, target: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let (SocketAddr::V4(source), SocketAddr::V4(target)) = (source, target) else {
        unreachable!("IPv4 only")
    };
    let udp_len = 8 + payload.len() as u16;
    let mut packet = Vec::with_capacity(20 + usize::from(udp_len));
    packet.extend_from_slice(&[0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0]);
    packet.extend_from_slice(&source.ip().octets());
    packet.extend_from_slice(&target.ip().octets());
    packet.extend_from_slice(&source.port().to_be_bytes());
    packet.extend_from_slice(&target.port().to_be_bytes());
    packet.extend_from_slice(&udp_len.to_be_bytes());
    packet.extend_from_slice(&[0, 0]);
    packet.extend_from_slice(payload);
    packet
}

/// Sends `count` spoofed datagrams to `server`, the i-th from
/// `source(i)`, as fast as one thread can; then waits until the server has
/// read or lost them all. Returns the server's datagrams read per second
/// from the first send to the last read, and its counters.
async fn spoofed_flood(
    handle: &ServerHandle,
    socket: socket2::Socket,
    count: u32,
    source: fn(u32) -> SocketAddr,
) -> (f64, Stats) {
    let server = SocketAddr::from((Ipv4Addr::LOCALHOST, handle.local_addr().port()));
    let before = handle.stats();
    let start = std::time::Instant::now();
    let sent = tokio::task::spawn_blocking(move || {
        let to = socket2::SockAddr::from(server);
        let mut sent = 0u64;
        for i in 0..count {
            let packet = spoofed(source(i), server, b"hello");
            // A full send buffer refuses a packet: it is not sent.
            if socket.send_to(&packet, &to).is_ok() {
                sent += 1;
            }
        }
        sent
    })
    .await
    .unwrap();
    let stats = wait_for_stats(handle, "the spoofed flood read or lost", |s| {
        s.received + s.kernel_drops.unwrap_or(0)
            >= before.received + before.kernel_drops.unwrap_or(0) + sent
            && s.in_flight == 0
    })
    .await;
    let read = stats.received - before.received;
    (read as f64 / start.elapsed().as_secs_f64(), stats)
}

/// The 127.x.y.z source of flood datagram `i` when each comes from a
/// source of its own...
fn many_sources(i: u32) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::from(0x7f01_0000 + i), 5353))
}

/// ...and when 8 sources send them all.
fn eight_sources(i: u32) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::new(127, 2, 0, (i % 8) as u8 + 1), 5353))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_flood_from_new_sources_is_handled_nearly_as_fast_as_one_from_known_ones() {
    let Some(socket) = spoofer() else {
        eprintln!("skipped: spoofing sources needs a raw socket (root or CAP_NET_RAW)");
        return;
    };
    // Twice as many sources as the rate limiter tracks (65 536 by
    // default), at 1 datagram a second each: once its table is full of
    // sources that are not idle, every new one looks for a place.
    const FLOOD: u32 = 131_072;
    let mut rates = Vec::new();
    for (name, source) in [
        ("8 sources", eight_sources as fn(u32) -> SocketAddr),
        ("131072 new sources", many_sources),
    ] {
        // A fresh server each time, so every source of the second flood
        // is new to the rate limiter's table.
        let limiter = abyss::middleware::PeerRateLimiter::new(RateQuota::per_second(1)).unwrap();
        // No replies: a reply to a spoofed loopback source costs the
        // kernel an ICMP error, which would swamp what is measured.
        let silent = service_fn(|_: Request| async { Ok::<_, Infallible>(None::<bytes::Bytes>) });
        let handle = Server::bind("0.0.0.0:0")
            .listeners(1)
            .rate_limiter(limiter.clone())
            .serve(silent)
            .await
            .unwrap();
        let (rate, stats) =
            spoofed_flood(&handle, socket.try_clone().unwrap(), FLOOD, source).await;
        assert_accounted(&stats);
        let limits = limiter.stats();
        assert!(limits.tracked_peers <= 65_536, "{limits:?}");
        println!(
            "reliability-detail: {name}: {rate:.0} datagrams/s read, {} read, {} lost by the kernel, {} rate limited, {} handled, {} sources tracked",
            stats.received,
            stats.kernel_drops.unwrap_or(0),
            stats.dropped.rate_limited,
            stats.no_reply,
            limits.tracked_peers,
        );
        rates.push(rate);
        handle.shutdown().await;
    }
    println!(
        "reliability: new-source flood | {FLOOD} spoofed datagrams, each from a new source vs from 8 | per-peer rate limit 1/s, 65536 tracked | read rate ratio {:.2}",
        rates[1] / rates[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_budget_caps_a_spoofed_flood_and_keeps_answering_validated_peers() {
    let Some(socket) = spoofer() else {
        eprintln!("skipped: spoofing sources needs a raw socket (root or CAP_NET_RAW)");
        return;
    };
    const SOURCES: u32 = 65_000;
    const EACH: u32 = 20;
    const BUDGET: u32 = 10_000;
    let friend_ip = Ipv4Addr::new(127, 0, 0, 77);
    let budget = abyss::middleware::ReplyBudget::builder()
        .replies_per_second(BUDGET)
        .exempt(move |peer: SocketAddr| peer.ip() == friend_ip)
        .build()
        .unwrap();
    let friend_reached = Arc::new(AtomicU64::new(0));
    let handle = Server::bind("0.0.0.0:0")
        // Every source stays under its own quota: 20 datagrams in all.
        .rate_limit(RateQuota::per_second(100))
        .reply_budget(budget.clone())
        .serve({
            // Counts what reaches the service from the validated peer: the
            // kernel may drop some under the flood, which no budget can
            // help; of what arrives, the budget must let the answers out.
            let reached = friend_reached.clone();
            service_fn(move |request: Request| {
                if request.peer().ip() == friend_ip {
                    reached.fetch_add(1, Ordering::Relaxed);
                }
                async move { Ok::<_, Infallible>(request.into_payload()) }
            })
        })
        .await
        .unwrap();
    let server = SocketAddr::from((Ipv4Addr::LOCALHOST, handle.local_addr().port()));
    let rss_before = rss_kib();
    let start = tokio::time::Instant::now();

    // The flood, each round one datagram from every source, kept within a
    // few dozen datagrams of what the server has read so that it
    // measures the budget, not the socket buffer.
    let flood = {
        let handle = handle.clone();
        tokio::task::spawn_blocking(move || {
            let to = socket2::SockAddr::from(server);
            let mut sent = 0u64;
            for round in 0..EACH {
                for i in 0..SOURCES {
                    let source =
                        SocketAddr::from((Ipv4Addr::from(0x7f01_0000 + i), 4000 + round as u16));
                    if socket
                        .send_to(&spoofed(source, server, b"hello"), &to)
                        .is_ok()
                    {
                        sent += 1;
                    }
                    while sent
                        > handle.stats().received + handle.stats().kernel_drops.unwrap_or(0) + 64
                    {
                        std::thread::yield_now();
                    }
                }
            }
            sent
        })
    };
    // Meanwhile a validated peer asks, one request at a time, within its
    // own quota (50 a second).
    let friend = UdpSocket::bind((friend_ip, 0)).await.unwrap();
    let mut asked = 0u32;
    let mut answered = 0u32;
    let mut buf = [0u8; 64];
    let mut pace = tokio::time::interval(Duration::from_millis(20));
    while !flood.is_finished() || asked < 200 {
        pace.tick().await;
        asked += 1;
        friend.send_to(&asked.to_be_bytes(), server).await.unwrap();
        let reply =
            tokio::time::timeout(Duration::from_millis(500), friend.recv_from(&mut buf)).await;
        if let Ok(Ok((n, _))) = reply
            && buf[..n] == asked.to_be_bytes()
        {
            answered += 1;
        }
    }
    let sent = flood.await.unwrap();
    let stats = wait_for_stats(&handle, "the flood read or lost", |s| {
        s.received + s.kernel_drops.unwrap_or(0) >= sent + u64::from(asked) && s.in_flight == 0
    })
    .await;
    let elapsed = start.elapsed().as_secs_f64();
    assert_accounted(&stats);
    let spent = budget.stats();
    let flood_replies = spent.sent;
    // The budget holds one second of replies, and refills at its rate.
    let allowed = f64::from(BUDGET) * (elapsed + 1.0);
    assert!(
        (flood_replies as f64) <= allowed,
        "{flood_replies} replies to the flood in {elapsed:.1} s, over the budget"
    );
    assert_eq!(stats.dropped.over_budget, spent.over_budget);
    assert!(
        stats.dropped.over_budget > 0,
        "the flood went over the budget: {stats:?}"
    );
    let reached = friend_reached.load(Ordering::Relaxed);
    assert!(
        answered as f64 >= 0.99 * reached as f64,
        "the validated peer got {answered} answers for {reached} of its {asked} queries that reached the service"
    );
    // What the flood can make the server keep is bounded by construction
    // (the rate limiter's table; the budget is two counters). The RSS is
    // the whole test process's, other tests included: reported, not
    // asserted.
    let tracked = handle.rate_limiter().unwrap().stats().tracked_peers;
    assert!(tracked <= 65_536, "{tracked} peers tracked");
    let growth = rss_kib().saturating_sub(rss_before);
    report(
        "reply budget",
        &format!("{sent} spoofed datagrams from {SOURCES} sources x {EACH}, each under its quota"),
        &format!("reply budget {BUDGET}/s"),
        &stats,
        0,
    );
    println!(
        "reliability-detail: reply budget: {flood_replies} flood replies in {elapsed:.1} s ({:.0}/s, budget {BUDGET}/s), {} over budget, validated peer answered {answered}/{asked} ({} reached the service), RSS growth {growth} KiB",
        flood_replies as f64 / elapsed,
        spent.over_budget,
        friend_reached.load(Ordering::Relaxed),
    );
    handle.shutdown().await;
}

/// This process's resident set, in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn empty_and_truncated_datagrams_are_handled_or_counted() {
    let handle = Server::bind(loopback())
        .listeners(1)
        .max_datagram_size(100)
        .serve(service_fn(|request: Request| async move {
            Ok::<_, Infallible>(if request.payload().is_empty() {
                None
            } else {
                Some(request.into_payload())
            })
        }))
        .await
        .unwrap();
    let socket = client().await;
    for _ in 0..10 {
        socket.send_to(&[], handle.local_addr()).await.unwrap();
        socket
            .send_to(&[9; 101], handle.local_addr())
            .await
            .unwrap();
    }
    let stats = wait_for_stats(&handle, "20 datagrams", |s| {
        s.received == 20 && s.in_flight == 0
    })
    .await;
    assert_eq!((stats.no_reply, stats.dropped.truncated), (10, 10));
    report(
        "empty and truncated",
        "10 empty, 10 of 101 bytes against 100",
        "bad sizes",
        &stats,
        0,
    );
    handle.shutdown().await;
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 2_000, ..Default::default() })]

    /// The DNS examples' request path on arbitrary bytes: an answer or
    /// nothing, never a panic.
    #[test]
    fn the_dns_request_path_survives_arbitrary_bytes(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            // An upstream that answers nothing, with a short timeout.
            let forwarder = abyss_examples::dns::Forwarder::new("127.0.0.1:9".parse().unwrap(), Duration::from_millis(1));
            let _ = forwarder.answer(&bytes).await;
            let resolver = abyss_examples::dns::Resolver::new(vec!["127.0.0.1".parse().unwrap()], 9, Duration::from_millis(1));
            let _ = resolver.answer(&bytes).await;
        });
        let peer: SocketAddr = "192.0.2.1:5353".parse().unwrap();
        let _ = abyss_examples::mdns::describe(peer, &bytes);
        let _ = abyss_examples::dhcp::describe(peer, &bytes);
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 64, ..Default::default() })]

    /// The recvmmsg path on arbitrary runs of datagram sizes (0 to 3000
    /// bytes against 1024-byte buffers): each datagram arrives intact or
    /// flagged truncated exactly when it is over the buffer.
    #[test]
    fn the_batch_receive_path_flags_every_size_correctly(sizes in proptest::collection::vec(0usize..3_000, 1..24)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(receive_and_check(&sizes));
    }
}

async fn receive_and_check(sizes: &[usize]) {
    use abyss::transport::{RecvMeta, Transport, UdpOptions, UdpTransport};
    use std::io::IoSliceMut;
    let transport = UdpTransport::bind(loopback(), &UdpOptions::new()).unwrap();
    let sender = UdpSocket::bind(loopback()).await.unwrap();
    for (i, size) in sizes.iter().enumerate() {
        let payload = vec![seen_tag(i); *size];
        sender
            .send_to(&payload, transport.local_addr().unwrap())
            .await
            .unwrap();
    }
    let mut storage = vec![vec![0u8; 1024]; 32];
    let mut seen = 0;
    while seen < sizes.len() {
        let mut meta = vec![RecvMeta::default(); 32];
        let n = tokio::time::timeout(
            PATIENCE,
            std::future::poll_fn(|cx| {
                let mut bufs: Vec<IoSliceMut<'_>> =
                    storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
                transport.poll_recv(cx, &mut bufs, &mut meta)
            }),
        )
        .await
        .expect("all datagrams arrive")
        .unwrap();
        for (m, buf) in meta.iter().zip(&storage).take(n) {
            let size = sizes[seen];
            assert_eq!(m.truncated, size > 1024, "datagram {seen} of {size} bytes");
            assert_eq!(m.len, size.min(1024));
            assert!(
                buf[..m.len].iter().all(|b| *b == seen_tag(seen)),
                "datagram {seen} intact"
            );
            seen += 1;
        }
    }
}

/// The byte datagram `i` is filled with.
fn seen_tag(i: usize) -> u8 {
    (i % 251) as u8
}
